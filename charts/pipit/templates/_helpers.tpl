{{/* Names, labels and the pieces every component shares (image, etcd settings). */}}

{{- define "pipit.name" -}}
{{- .Chart.Name -}}
{{- end -}}

{{/* A component's name: <release>-<component>, e.g. pipit-node (at most 63 characters). */}}
{{- define "pipit.componentName" -}}
{{- $root := index . 0 -}}
{{- printf "%s-%s" $root.Release.Name (index . 1) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "pipit.selectorLabels" -}}
{{- $root := index . 0 -}}
app.kubernetes.io/name: {{ include "pipit.name" $root }}
app.kubernetes.io/instance: {{ $root.Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end -}}

{{- define "pipit.labels" -}}
{{ include "pipit.selectorLabels" . }}
app.kubernetes.io/version: {{ (index . 0).Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ (index . 0).Release.Service }}
helm.sh/chart: {{ printf "%s-%s" (index . 0).Chart.Name (index . 0).Chart.Version }}
{{- end -}}

{{- define "pipit.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "pipit.serviceAccountName" -}}
{{- $root := index . 0 -}}
{{- $key := index . 1 -}}
{{- $sa := index $root.Values.serviceAccounts $key -}}
{{- default (include "pipit.componentName" (list $root (index . 2))) $sa.name -}}
{{- end -}}

{{/* The etcd Secret's name (none: ""). */}}
{{- define "pipit.etcdSecret" -}}
{{- if eq .Values.etcd.tls.source "existingSecret" -}}
{{- .Values.etcd.tls.existingSecret -}}
{{- else if eq .Values.etcd.tls.source "values" -}}
{{- include "pipit.componentName" (list . "etcd-tls") -}}
{{- end -}}
{{- end -}}

{{- define "pipit.etcdDir" -}}/etc/pipit/etcd{{- end -}}

{{/* Environment every Pipit program reads its etcd settings from (ipam.store). */}}
{{- define "pipit.etcdEnv" -}}
- name: PIPIT_ETCD_ENDPOINTS
  value: {{ required "etcd.endpoints is required: the client URLs of your etcd cluster, e.g. --set etcd.endpoints={https://10.0.0.10:2379}" (join "," .Values.etcd.endpoints | default nil) | quote }}
{{- if include "pipit.etcdSecret" . }}
- name: PIPIT_ETCD_CA_CERT_FILE
  value: {{ include "pipit.etcdDir" . }}/ca.crt
- name: PIPIT_ETCD_CERT_FILE
  value: {{ include "pipit.etcdDir" . }}/tls.crt
- name: PIPIT_ETCD_KEY_FILE
  value: {{ include "pipit.etcdDir" . }}/tls.key
{{- end }}
{{- with .Values.etcd.auth }}{{ if .existingSecret }}
- name: PIPIT_ETCD_USERNAME
  valueFrom: {secretKeyRef: {name: {{ .existingSecret | quote }}, key: {{ .usernameKey | quote }}}}
- name: PIPIT_ETCD_PASSWORD
  valueFrom: {secretKeyRef: {name: {{ .existingSecret | quote }}, key: {{ .passwordKey | quote }}}}
{{- end }}{{ end }}
{{- end -}}

{{- define "pipit.etcdVolumeMount" -}}
{{- if include "pipit.etcdSecret" . -}}
- name: etcd-tls
  mountPath: {{ include "pipit.etcdDir" . }}
  readOnly: true
{{- end }}
{{- end -}}

{{/* The TLS files, read-only and 0400 (root's only). */}}
{{- define "pipit.etcdVolume" -}}
{{- if include "pipit.etcdSecret" . -}}
- name: etcd-tls
  secret:
    secretName: {{ include "pipit.etcdSecret" . }}
    defaultMode: 0400
    items:
      - {key: ca.crt, path: ca.crt}
      - {key: tls.crt, path: tls.crt}
      - {key: tls.key, path: tls.key}
{{- end }}
{{- end -}}

{{/* Least privilege for a container that needs no capability at all. */}}
{{- define "pipit.noCapabilities" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities: {drop: [ALL]}
{{- end -}}

{{/* The BGP password Secrets the peers and the mesh name, as one projected volume laid out
     the way the agent's --secrets-dir reads them: DIR/<secret>/<key>, each key once. */}}
{{- define "pipit.peerSecretSources" -}}
{{- $refs := dict }}
{{- range .Values.bgp.peers }}
{{- with .password }}
{{- $_ := set $refs (printf "%s/%s" .secretKeyRef.name .secretKeyRef.key) .secretKeyRef }}
{{- end }}
{{- end }}
{{- with (.Values.bgp.nodeMeshPassword | default dict).secretKeyRef }}
{{- $_ := set $refs (printf "%s/%s" .name .key) . }}
{{- end }}
{{- range $path, $ref := $refs }}
- secret:
    name: {{ $ref.name }}
    items:
      - key: {{ $ref.key }}
        path: {{ $path }}
        mode: 0400
{{- end }}
{{- end -}}

{{- define "pipit.secretsDir" -}}/etc/pipit/bgp-secrets{{- end -}}

{{/* The sidecar: ExaBGP on the files the agent writes into the shared state directory
     (bgp_agent.exabgp_process.exabgp_command), started once they exist. */}}
{{- define "pipit.exabgpContainer" -}}
{{- $root := index . 0 -}}
{{- $resources := index . 1 -}}
- name: exabgp
  image: {{ include "pipit.image" $root }}
  imagePullPolicy: {{ $root.Values.image.pullPolicy }}
  command:
    - sh
    - -c
    - |
      state={{ $root.Values.node.stateDir }}/exabgp
      until [ -s "$state/exabgp.conf" ] && [ -s "$state/exabgp.env" ]; do sleep 1; done
      exec pipit-exabgp --env-file "$state/exabgp.env" server "$state/exabgp.conf"
  ports:
    - {name: bgp, containerPort: 179, protocol: TCP}
  securityContext:
    allowPrivilegeEscalation: false
    readOnlyRootFilesystem: true
    capabilities:
      drop: [ALL]
      add: [NET_BIND_SERVICE]  # BGP's port 179
  resources: {{- toYaml $resources | nindent 4 }}
  volumeMounts:
    - {name: state, mountPath: {{ $root.Values.node.stateDir }}}
    - {name: tmp, mountPath: /tmp}
{{- end -}}

{{/* The node DaemonSet's affinity: node.affinity, and with dedicated route reflectors, off
     them: every required term of node.affinity (or none) ANDed with "not all of the
     reflectors' labels" (one term per label: the terms are ORed). */}}
{{- define "pipit.nodeAffinity" -}}
{{- $affinity := deepCopy .Values.node.affinity -}}
{{- if .Values.routeReflector.enabled -}}
{{- $nodeAffinity := $affinity.nodeAffinity | default dict -}}
{{- $required := $nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution | default dict -}}
{{- $userTerms := $required.nodeSelectorTerms | default (list dict) -}}
{{- $terms := list -}}
{{- range $user := $userTerms -}}
{{- range $key, $value := $.Values.routeReflector.nodeSelector -}}
{{- $expression := dict "key" $key "operator" "NotIn" "values" (list $value) -}}
{{- $term := deepCopy $user -}}
{{- $_ := set $term "matchExpressions" (append ($user.matchExpressions | default list) $expression) -}}
{{- $terms = append $terms $term -}}
{{- end -}}
{{- end -}}
{{- $_ := set $required "nodeSelectorTerms" $terms -}}
{{- $_ := set $nodeAffinity "requiredDuringSchedulingIgnoredDuringExecution" $required -}}
{{- $_ := set $affinity "nodeAffinity" $nodeAffinity -}}
{{- end -}}
{{- toYaml $affinity -}}
{{- end -}}

{{/* The labels pipit-rr gives its node record: the reflectors' node selector (the peering
     BGPPeer selects reflectors and clients by them), as --labels K=V,... */}}
{{- define "pipit.reflectorLabels" -}}
{{- $pairs := list -}}
{{- range $key, $value := .Values.routeReflector.nodeSelector -}}
{{- $pairs = append $pairs (printf "%s=%s" $key $value) -}}
{{- end -}}
{{- join "," $pairs -}}
{{- end -}}

{{/* Selector expressions (Calico syntax) for the reflectors and their clients. */}}
{{- define "pipit.reflectorSelector" -}}
{{- $terms := list -}}
{{- range $key, $value := .Values.routeReflector.nodeSelector -}}
{{- $terms = append $terms (printf "%s == '%s'" $key $value) -}}
{{- end -}}
{{- join " && " $terms -}}
{{- end -}}

{{/* The cluster's Pipit resources, as `pipitctl apply` takes them. */}}
{{- define "pipit.resources" -}}
{{- $pool := .Values.ipPool -}}
{{- $rr := .Values.routeReflector.enabled -}}
{{- if $pool.create }}
apiVersion: pipit.dev/v1
kind: IPPool
metadata: {name: {{ $pool.name }}}
spec:
  cidr: {{ $pool.cidr }}
  blockSize: {{ $pool.blockSize }}
  ipipMode: {{ if eq $pool.encapsulation "IPIP" }}{{ $pool.encapsulationMode }}{{ else }}Never{{ end }}
  vxlanMode: {{ if eq $pool.encapsulation "VXLAN" }}{{ $pool.encapsulationMode }}{{ else }}Never{{ end }}
  natOutgoing: {{ $pool.natOutgoing }}
  nodeSelector: {{ $pool.nodeSelector | quote }}
---
{{- end }}
apiVersion: pipit.dev/v1
kind: BGPConfiguration
metadata: {name: default}
spec:
  asNumber: {{ .Values.bgp.asNumber | quote }}
  nodeToNodeMeshEnabled: {{ not $rr }}
  {{- if not $rr }}
  nodeMeshHoldTime: {{ .Values.bgp.nodeMeshHoldTime }}
  nodeMeshMaxRestartTime: {{ .Values.bgp.nodeMeshMaxRestartTime }}
  {{- with (.Values.bgp.nodeMeshPassword | default dict).secretKeyRef }}
  nodeMeshPassword: {secretKeyRef: {name: {{ .name | quote }}, key: {{ .key | quote }}}}
  {{- end }}
  {{- end }}
  listenPort: {{ .Values.bgp.listenPort }}
  communities: {{ toJson .Values.bgp.communities }}
  {{- with .Values.bgp.prefixAdvertisements }}
  prefixAdvertisements: {{ toJson . }}
  {{- end }}
  {{- range $field := list "serviceClusterIPs" "serviceExternalIPs" "serviceLoadBalancerIPs" }}
  {{- with index $.Values.bgp $field }}
  {{ $field }}: {{ toJson . }}
  {{- end }}
  {{- end }}
  {{- if eq .Values.bgp.serviceLoadBalancerAggregation "Disabled" }}
  serviceLoadBalancerAggregation: Disabled
  {{- end }}
{{- if $rr }}
---
# every node that is not a reflector peers with every reflector; the reflectors peer back
# (reversePeering Auto) and mesh among themselves (the same cluster id)
apiVersion: pipit.dev/v1
kind: BGPPeer
metadata: {name: {{ include "pipit.componentName" (list . "route-reflectors") }}}
spec:
  nodeSelector: {{ printf "!(%s)" (include "pipit.reflectorSelector" .) | quote }}
  peerSelector: {{ include "pipit.reflectorSelector" . | quote }}
  holdTime: {{ .Values.bgp.nodeMeshHoldTime }}
  maxRestartTime: {{ .Values.bgp.nodeMeshMaxRestartTime }}
{{- end }}
{{- if .Values.ipam.configure }}
---
apiVersion: pipit.dev/v1
kind: IPAMConfiguration
metadata: {name: default}
spec:
  strictAffinity: {{ .Values.ipam.strictAffinity }}
  maxBlocksPerHost: {{ .Values.ipam.maxBlocksPerHost }}
  ipCooldownSeconds: {{ .Values.ipam.ipCooldownSeconds }}
  autoAllocateBlocks: {{ .Values.ipam.autoAllocateBlocks }}
{{- end }}
{{- range .Values.bgp.filters }}
---
apiVersion: pipit.dev/v1
kind: BGPFilter
metadata: {name: {{ .name }}}
spec: {{- toYaml (omit . "name") | nindent 2 }}
{{- end }}
{{- range .Values.bgp.peers }}
---
apiVersion: pipit.dev/v1
kind: BGPPeer
metadata: {name: {{ .name }}}
spec: {{- toYaml (omit . "name") | nindent 2 }}
{{- end }}
{{- end -}}
