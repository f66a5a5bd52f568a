"""pipit-controller: the Kubernetes side of Pipit (node deletion, leak GC, label sync)."""
