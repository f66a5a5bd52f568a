"""The resource envelope shared by every kind: calicoctl-style YAML/JSON documents.

    apiVersion: pipit.dev/v1
    kind: IPPool
    metadata: {name: pool-a, labels: {...}, annotations: {...}}
    spec: {...camelCase fields...}

The same shape is what etcd stores under /pipit/resources/<plural>/<name>. Calico's documents
(apiVersion projectcalico.org/v3, as calicoctl prints them) are read too, for the kinds
Pipit shares (`CALICO_KINDS`). Labels and annotations follow Kubernetes' rules
(`check_metadata`), checked where a resource comes in (pipitctl, the agent's own record);
what is already stored is read as it is.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Mapping
from fractions import Fraction
from ipaddress import IPv4Network, ip_address, ip_network
from dataclasses import dataclass, field, replace

import yaml

from ipam.errors import InvalidResource

API_VERSION = "pipit.dev/v1"
# Calico's documents (`calicoctl get -o yaml`) are read too, for the kinds Pipit shares: the
# same fields. What Calico's datastore set on them (status, its resourceVersion) is left out.
CALICO_API_VERSION = "projectcalico.org/v3"
CALICO_KINDS = ("IPPool", "IPReservation", "IPAMConfiguration", "BGPConfiguration", "BGPPeer",
                "BGPFilter", "Node")
_NAME = re.compile(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?")
# Kubernetes: a qualified name is [DNS subdomain prefix/]name, the name at most 63 characters
# of [A-Za-z0-9_.-] beginning and ending with a letter or digit; a label value is empty or the
# same as such a name.
_LABEL_NAME = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?")
_DNS_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
_DNS_SUBDOMAIN = re.compile(rf"{_DNS_LABEL}(\.{_DNS_LABEL})*")
MAX_ANNOTATIONS_SIZE = 256 * 1024  # bytes of keys and values together, as Kubernetes
# A Go duration (Kubernetes' metav1.Duration, as Calico writes times): "90s", "2m", "1m30s".
_DURATION_PART = re.compile(r"([0-9]+(?:\.[0-9]*)?|\.[0-9]+)(ns|us|µs|μs|ms|s|m|h)")
_UNIT_SECONDS = {"ns": Fraction(1, 10**9), "us": Fraction(1, 10**6), "µs": Fraction(1, 10**6),
                 "μs": Fraction(1, 10**6), "ms": Fraction(1, 1000), "s": Fraction(1),
                 "m": Fraction(60), "h": Fraction(3600)}


def duration_seconds(text: str) -> Fraction | None:
    """The seconds a Go duration string stands for (None if it is not one)."""
    text = text.strip()
    if text == "0":
        return Fraction(0)
    if not text or len(text) > 64:
        return None
    total, position = Fraction(0), 0
    while position < len(text):
        part = _DURATION_PART.match(text, position)
        if part is None:
            return None
        total += Fraction(part[1]) * _UNIT_SECONDS[part[2]]
        position = part.end()
    return total


def duration_argument(text: str) -> float:
    """A command line's duration, in seconds: a Go duration (15m, 90s) or a number (900)."""
    seconds = duration_seconds(text) if not text.replace(".", "", 1).isdigit() else float(text)
    if seconds is None or seconds < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration such as 15m, 90s or 900")
    return float(seconds)


def shown(value: object, limit: int = 60) -> str:
    """A value as an error message quotes it: its repr, cut short when it is long."""
    if isinstance(value, int) and value.bit_length() > 200:  # (repr fails past 4300 digits)
        return f"a number of about {int(value.bit_length() * 0.30103) + 1} digits"
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


@dataclass(frozen=True)
class Document:
    kind: str
    name: str
    spec: Mapping
    labels: Mapping[str, str]
    annotations: Mapping[str, str] = field(default_factory=dict)
    # metadata.resourceVersion, as `get` showed it: the etcd mod_revision the object had
    resource_version: int | None = None
    calico: bool = False  # written as Calico's (apiVersion projectcalico.org/v3)


# -- reading YAML that may be hostile -------------------------------------------------------
# Limits far above any real resource file (a 1,000-node file is ~150 KB, ~10,000 values), so
# that a hostile one is refused in one sentence at once instead of eating memory or the stack.
MAX_INPUT_BYTES = 4 * 1024 * 1024
MAX_DOCUMENTS = 10_000
MAX_VALUES = 500_000  # every value of every document, aliases counted as what they expand to
MAX_DEPTH = 32  # nested mappings and lists (a resource needs about 5)
MAX_NUMBER_DIGITS = 30  # past any count, port or AS number
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml's parser when there: 10x
_RESOLVER = yaml.resolver.Resolver()  # which plain scalars YAML reads as integers
_INT_TAG = "tag:yaml.org,2002:int"


class _Loader(_LOADER):
    """YAML's safe loader, refusing a key given twice in one mapping (the last would win
    silently: a pasted line would quietly change a pool's CIDR)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            first_line: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` may override
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    repeated = key in first_line
                except TypeError:  # a list or mapping as a key
                    raise _Refused("uses a list or mapping as a key", key_node.start_mark) from None
                if repeated:
                    raise _Refused(f"gives key {shown(key)} twice in one mapping (first at line "
                                   f"{first_line[key]}; the last would silently win)",
                                   key_node.start_mark)
                first_line[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


class _Refused(yaml.YAMLError):
    """The input is YAML, but not YAML pipitctl reads."""

    def __init__(self, problem: str, mark=None):
        super().__init__(problem)
        self.problem, self.problem_mark = problem, mark


def _check_shape(text: str) -> None:
    """Walk the YAML's events (no objects built, no recursion) and refuse what would take
    the stack (deep nesting), memory (aliases that expand to millions of values, recursive
    aliases) or time (numbers too long to convert, too many documents)."""
    documents = 0
    values = 0  # in all documents, aliases expanded
    frames: list[list] = []  # open mappings and lists: [anchor, values in it so far]
    sizes: dict[str, int] = {}  # anchor -> values it expands to
    for event in yaml.parse(text, Loader=_LOADER):
        size = 0
        if isinstance(event, yaml.DocumentStartEvent):
            documents += 1
            if documents > MAX_DOCUMENTS:
                raise _Refused(f"holds more than {MAX_DOCUMENTS} documents; split it")
        elif isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
            frames.append([event.anchor, 1])
            if len(frames) > MAX_DEPTH:
                raise _Refused(f"nests lists and mappings more than {MAX_DEPTH} deep",
                               event.start_mark)
            continue
        elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
            anchor, size = frames.pop()
            if anchor is not None:
                sizes[anchor] = size
        elif isinstance(event, yaml.ScalarEvent):
            size = 1
            if event.anchor is not None:
                sizes[event.anchor] = 1
            if event.implicit[0] and not event.style and len(event.value) > MAX_NUMBER_DIGITS \
                    and _RESOLVER.resolve(yaml.ScalarNode, event.value, (True, False)) == _INT_TAG:
                raise _Refused(f"has a number of {len(event.value)} characters, longer than any "
                               f"field takes ({MAX_NUMBER_DIGITS} at most)", event.start_mark)
        elif isinstance(event, yaml.AliasEvent):
            if any(anchor == event.anchor for anchor, _ in frames):
                raise _Refused(f"has alias *{event.anchor} inside the value it refers to",
                               event.start_mark)
            size = sizes.get(event.anchor, 1)
        else:
            continue
        if frames:
            frames[-1][1] += size
            size = frames[-1][1]
        else:
            values += size
        if size > MAX_VALUES or values > MAX_VALUES:
            raise _Refused(f"holds more than {MAX_VALUES} values (aliases counted as what they "
                           "expand to)", event.start_mark)


def parse_documents(text: str) -> list[dict]:
    """Every non-empty document of a YAML (or JSON) stream, in order, each a mapping."""
    docs = load_documents(text)
    for number, doc in enumerate(docs, 1):
        if not isinstance(doc, dict):
            raise InvalidResource(f"document {number} is not a mapping with apiVersion, kind, "
                                  "metadata and spec.")
    return docs


def load_documents(text: str) -> list:
    """Every non-empty document of a YAML (or JSON) stream, in order. Input past the limits
    above, aliases that expand past them (a "billion laughs"), recursive aliases, keys given
    twice and numbers too long to be any field are refused in one sentence."""
    if len(text) > MAX_INPUT_BYTES:
        raise InvalidResource(f"the input is {len(text)} characters long, more than the "
                              f"{MAX_INPUT_BYTES} pipitctl reads at once; split it.")
    try:
        _check_shape(text)
        docs = [d for d in yaml.load_all(text, Loader=_Loader) if d is not None]
    except _Refused as error:
        mark = error.problem_mark
        where = f" at line {mark.line + 1}" if mark else ""
        raise InvalidResource(f"the input{where} {error.problem}.") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        problem = getattr(error, "problem", None) or "cannot be parsed"
        raise InvalidResource(f"the input is not valid YAML{where}: {problem}.") from None
    return docs


def check_name(kind: str, name: object) -> str:
    if name is None or name == "":
        raise InvalidResource(f"{kind} has no metadata.name; give it one, such as 'default'.")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise InvalidResource(
            f"{kind} name {name!r} is not valid: use lower-case letters, digits, '-' and '.', "
            "starting and ending with a letter or digit.")
    return name


def read_document(doc: Mapping) -> Document:
    """Check the envelope of one document (not its spec)."""
    kind = doc.get("kind")
    if not isinstance(kind, str) or not kind:
        raise InvalidResource("a document has no kind.")
    api = doc.get("apiVersion")
    calico = api == CALICO_API_VERSION
    if api != API_VERSION and not calico:
        raise InvalidResource(f"{kind} has apiVersion {api!r}; Pipit reads {API_VERSION!r} "
                              f"(and Calico's {CALICO_API_VERSION!r}).")
    if calico and kind not in CALICO_KINDS:
        raise InvalidResource(f"Calico's {kind} is not a resource Pipit has; of Calico's "
                              f"resources it takes {', '.join(CALICO_KINDS)}.")
    unknown = set(doc) - {"apiVersion", "kind", "metadata", "spec"} - ({"status"} if calico
                                                                        else set())
    if unknown:
        raise InvalidResource(f"{kind} has unknown top-level field {sorted(unknown)[0]!r}.")
    metadata = doc.get("metadata") or {}
    if not isinstance(metadata, dict):
        raise InvalidResource(f"{kind} metadata must be a mapping.")
    name = check_name(kind, metadata.get("name"))
    labels = _string_map(metadata, "labels", kind, name)
    annotations = _string_map(metadata, "annotations", kind, name)
    version = None if calico else metadata.get("resourceVersion")  # Calico's: not etcd's here
    if version is not None and version != "":
        if isinstance(version, bool) or not isinstance(version, (str, int)) \
                or not str(version).isascii() or not str(version).isdigit() \
                or len(str(version)) > 19 or int(version) < 1:
            raise InvalidResource(f"{kind} {name!r}: metadata.resourceVersion {shown(version)} "
                                  "is not one `pipitctl get` shows; remove it, or get the "
                                  "resource again.")
        version = int(version)
    else:
        version = None
    spec = doc.get("spec")
    if spec is None:
        spec = {}
    if not isinstance(spec, dict):
        raise InvalidResource(f"{kind} {name!r}: spec must be a mapping.")
    return Document(kind, name, spec, labels, annotations, version, calico)


def _string_map(metadata: Mapping, field_name: str, kind: str, name: str) -> dict[str, str]:
    value = metadata.get(field_name) or {}
    if not isinstance(value, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise InvalidResource(f"{kind} {name!r}: metadata.{field_name} must map strings to "
                              "strings (quote values such as 'true' or '1').")
    return value


def _qualified_name_problem(key: str) -> str | None:
    """Why `key` is not a Kubernetes qualified name (None if it is one)."""
    prefix, slash, rest = key.rpartition("/")
    if slash and not prefix:
        return "has an empty prefix before '/'"
    if slash and (len(prefix) > 253 or not _DNS_SUBDOMAIN.fullmatch(prefix)):
        return (f"has prefix {shown(prefix)}, which is not a DNS subdomain (lower-case letters, "
                "digits, '-' and '.', at most 253 characters)")
    if not _LABEL_NAME.fullmatch(rest):
        return ("is not [PREFIX/]NAME with NAME at most 63 letters, digits, '-', '_' or '.', "
                "beginning and ending with a letter or digit")
    return None


def check_labels(where: str, labels: Mapping[str, str], what: str = "label") -> None:
    """Kubernetes' label rules (Calico applies them to every resource): one sentence naming
    the first label that breaks them."""
    for key, value in labels.items():
        problem = _qualified_name_problem(key)
        if problem:
            raise InvalidResource(f"{where}: {what} key {shown(key)} {problem}.")
        if value and not _LABEL_NAME.fullmatch(value):
            raise InvalidResource(
                f"{where}: {what} {key}={shown(value)}: a label value is empty or at most 63 "
                "letters, digits, '-', '_' or '.', beginning and ending with a letter or digit.")


def check_annotations(where: str, annotations: Mapping[str, str]) -> None:
    """Kubernetes' annotation rules: qualified-name keys (any case, as Calico checks them),
    any values, at most 256 KiB in all."""
    size = 0
    for key, value in annotations.items():
        problem = _qualified_name_problem(key.lower())
        if problem:
            raise InvalidResource(f"{where}: annotation key {shown(key)} {problem}.")
        size += len(key.encode()) + len(value.encode())
    if size > MAX_ANNOTATIONS_SIZE:
        raise InvalidResource(f"{where}: the annotations take {size} bytes, more than the "
                              f"{MAX_ANNOTATIONS_SIZE} Kubernetes allows.")


def check_metadata(document: Document) -> None:
    where = f"{document.kind} {document.name!r}"
    check_labels(where, document.labels)
    check_annotations(where, document.annotations)


def with_metadata(obj, document: Document):
    """A resource's object (a dataclass with labels and annotations) carrying the document's."""
    return replace(obj, labels=dict(document.labels), annotations=dict(document.annotations))


def make_document(kind: str, name: str, spec: Mapping, labels: Mapping[str, str] | None = None,
                  annotations: Mapping[str, str] | None = None) -> dict:
    metadata: dict = {"name": name}
    if labels:
        metadata["labels"] = dict(labels)
    if annotations:
        metadata["annotations"] = dict(annotations)
    return {"apiVersion": API_VERSION, "kind": kind, "metadata": metadata, "spec": dict(spec)}


class SpecReader:
    """Typed access to a spec's fields with one-sentence errors naming the resource."""

    def __init__(self, kind: str, name: str, spec: Mapping, fields: set[str],
                 unsupported: Mapping[str, str] = {}):
        """`unsupported`: fields of Calico's Pipit does not do, each with why (refused in that
        sentence when given a value, rather than as unknown)."""
        self.where = f"{kind} {name!r}"
        for field_name, why in unsupported.items():
            if spec.get(field_name) not in (None, "", [], {}):
                raise InvalidResource(f"{self.where}: {field_name} is not supported: {why}")
        unknown = sorted(set(spec) - fields - set(unsupported))
        if unknown:
            raise InvalidResource(f"{self.where}: unknown spec field {unknown[0]!r} (known: "
                                  f"{', '.join(sorted(fields))}).")
        self.spec = spec

    def fail(self, message: str) -> InvalidResource:
        return InvalidResource(f"{self.where}: {message}")

    def _typed(self, field: str, default, types: tuple, what: str):
        value = self.spec.get(field, default)
        if value is None:
            return default
        # bool is an int in Python; a count must not accept true/false.
        if not isinstance(value, types) or (bool not in types and isinstance(value, bool)):
            raise self.fail(f"{field} must be {what}, not {shown(value)}.")
        return value

    def string(self, field: str, default: str | None = None) -> str | None:
        return self._typed(field, default, (str,), "a string")

    def boolean(self, field: str, default: bool = False) -> bool:
        return self._typed(field, default, (bool,), "true or false")

    def integer(self, field: str, default: int | None = None) -> int | None:
        return self._typed(field, default, (int,), "a whole number")

    def seconds(self, field: str, default: int) -> int:
        """A time in whole seconds: a number, or a duration as Calico writes it ("120s",
        "2m", "1m30s")."""
        value = self.spec.get(field)
        if value is None:
            return default
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        seconds = duration_seconds(value) if isinstance(value, str) else None
        if seconds is None:
            raise self.fail(f"{field} must be whole seconds or a duration such as '90s' or "
                            f"'2m', not {shown(value)}.")
        if seconds.denominator != 1:
            raise self.fail(f"{field} {shown(value)} is not a whole number of seconds.")
        return int(seconds)

    def ipv4_network(self, label: str, text: str, what: str) -> IPv4Network:
        """`text` as an IPv4 network without host bits (a bare address is a /32); `label`
        starts each sentence about it, `what` says what was expected ("a CIDR such as
        10.96.0.0/12")."""
        text = text.strip()
        try:
            network = ip_network(text, strict=False)
        except ValueError:
            raise self.fail(f"{label} {text!r} is not {what}.") from None
        if network.version != 4:
            raise self.fail(f"{label} {text} is IPv6; Pipit is IPv4 only for now.")
        if network.network_address != ip_address(text.partition("/")[0]):
            raise self.fail(f"{label} {text} has host bits set; write it as {network}.")
        return network

    def choice(self, field: str, default: str, choices: tuple[str, ...]) -> str:
        """One of `choices`; "" means the default, as in Calico's enums (ipipMode: "")."""
        value = self.string(field, default) or default
        if value not in choices:
            raise self.fail(f"{field} {shown(value)} is not one of {', '.join(choices)}.")
        return value
