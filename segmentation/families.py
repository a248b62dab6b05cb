"""Model families behind one interface (SEG_MODEL, `--model`, `--init`).

Every family's network maps Bx3xHxW normalised input to BxCxHxW logits (C = labels +
background) and is described by a JSON-able spec with `n_classes`, `size_multiple`,
`normalization` and `family`:
- `unet`: NetworkConfig, the from-scratch monai U-Net (segmentation/network.py);
- `hf:<Hub id or folder>`: HFNetworkConfig, a pretrained transformers model (hf_network.py).

`initial_network` is where a training run starts: a fresh U-Net, a pretrained model with a head
for the project's labels, or an earlier version (`--init`, or the project's current model), whose
weights are carried over and whose head keeps the rows of the labels both share.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from segmentation.hf_network import (
    BACKGROUND_NAMES,
    PREFIX,
    HFNetworkConfig,
    build_hf_network,
    load_pretrained,
    source_of,
)
from segmentation.network import DEFAULT_CHANNELS, NetworkConfig, build_network

NetworkSpec = NetworkConfig | HFNetworkConfig
FAMILIES = ("unet", "hf:<Hub id or save_pretrained folder>")
_PROBE_CLASSES = 97  # a class count no layer width shares: what changes with it is the head


def check_model(model: str) -> str:
    """SEG_MODEL / --model as given, or ValueError naming the choices."""
    if model == "unet" or (model.startswith(PREFIX) and source_of(model)):
        return model
    raise ValueError(f"unknown model {model!r}; expected one of {', '.join(FAMILIES)}")


def network_from_json(data: Mapping[str, Any]) -> NetworkSpec:
    """The spec a version's metrics.json records; no `family` key: a U-Net (older versions)."""
    family = data.get("family", "unet")
    if family == "unet":
        return NetworkConfig.from_json(dict(data))
    if family == "hf":
        return HFNetworkConfig.from_json(dict(data))
    raise ValueError(f"unknown model family {family!r} in the version's network")


def build(spec: NetworkSpec) -> torch.nn.Module:
    """The spec's network with fresh weights."""
    return build_hf_network(spec) if isinstance(spec, HFNetworkConfig) else build_network(spec)


def with_classes(spec: NetworkSpec, n_classes: int, names: Sequence[str] | None = None) -> NetworkSpec:
    """The same architecture with a head for `n_classes` classes (named `names`, for HF configs)."""
    if isinstance(spec, HFNetworkConfig):
        names = list(names or ["background"] + [f"class{k}" for k in range(1, n_classes)])
        hf_config = spec.hf_config | {
            "num_labels": n_classes,
            "id2label": dict(enumerate(names)),
            "label2id": {name: k for k, name in enumerate(names)},
        }
        return replace(spec, n_classes=n_classes, hf_config=hf_config)
    return replace(spec, n_classes=n_classes)


def head_dims(spec: NetworkSpec) -> dict[str, tuple[int, ...]]:
    """state_dict keys whose shape depends on the number of classes (the output head), each with
    the dimensions that are class indices."""
    ours = {key: value.shape for key, value in build(spec).state_dict().items()}
    probe = build(with_classes(spec, _PROBE_CLASSES)).state_dict()
    head = {}
    for key, value in probe.items():
        if ours.get(key) != value.shape:
            head[key] = tuple(d for d, size in enumerate(value.shape) if size != ours[key][d])
    return head


@dataclass
class InitialNetwork:
    """Where a run starts: the network (train mode, CPU), its spec, and which state_dict keys
    came pretrained (empty: from scratch). `head` are the keys that depend on the classes."""

    network: torch.nn.Module
    spec: NetworkSpec
    pretrained_keys: set[str]
    head: set[str]
    source: str  # "scratch", the hf source, or the version folder it started from


def initial_network(
    model: str,
    labels: Sequence[str],
    init: str | None = None,
    allow_hub: bool = False,
    channels: tuple[int, ...] = DEFAULT_CHANNELS,
    label_map: Mapping[str, str] | None = None,
) -> InitialNetwork:
    """The network a run for `labels` starts from.

    init: a version folder (its weights, any family, the head's rows matched by label name), or a
    pretrained model (`hf:<id>` or a save_pretrained folder). None: `model` ("unet" from scratch,
    or `hf:<id>` pretrained). A pretrained head's rows carry over to the labels `label_map`
    (SEG_LABEL_MAP) or a case-insensitive name match gives them, so fine-tuning starts where
    zero-shot pre-annotation was.
    """
    from segmentation.versions import METRICS_FILE, load_version  # versions imports this module

    n_classes = len(labels) + 1
    if init and (Path(init) / METRICS_FILE).is_file():
        earlier = load_version(Path(init), "cpu")
        spec = with_classes(earlier.info.network, n_classes, ("background", *labels))
        network = build(spec)
        old_classes = ["background", *earlier.info.labels]
        head = head_dims(spec)
        new_classes = ("background", *labels)
        transferred = transfer_state(earlier.network.state_dict(), old_classes, network, new_classes, head)
        return InitialNetwork(network.train(), spec, transferred - set(head), set(head), str(init))
    source = init or model
    if source == "unet":
        spec = NetworkConfig(n_classes=n_classes, channels=tuple(channels))
        return InitialNetwork(build(spec).train(), spec, set(), set(head_dims(spec)), "scratch")
    if init and not init.startswith(PREFIX):
        source = PREFIX + init  # a save_pretrained folder given to --init as a path
    hf_source = source_of(check_model(source))
    pretrained, pretrained_spec = load_pretrained(hf_source, allow_hub)
    old_classes = pretrained_class_names(pretrained_spec.id2label, labels, label_map or {})
    spec = with_classes(pretrained_spec, n_classes, ("background", *labels))
    network = build(spec)
    head = head_dims(spec)
    new_classes = ("background", *labels)
    transferred = transfer_state(pretrained.state_dict(), old_classes, network, new_classes, head)
    return InitialNetwork(network.train(), spec, transferred - set(head), set(head), hf_source)


def pretrained_class_names(
    id2label: Mapping[int, str], labels: Sequence[str], label_map: Mapping[str, str]
) -> list[str]:
    """A pretrained model's classes named as the project would name them, so that its head's rows
    carry over to the labels they mean: background-like names are "background", others go through
    `label_map` (parse_label_map's form; unmapped ones match nothing) or, without one, match a
    project label that differs only in case."""
    by_lower = {label.lower(): label for label in labels}
    names = []
    for index in range(len(id2label)):
        name = str(id2label.get(index, ""))
        if name.lower() in BACKGROUND_NAMES:
            names.append("background")
        elif label_map:
            names.append(label_map.get(name.lower(), f"\0unmapped-{index}"))
        else:
            names.append(by_lower.get(name.lower(), name))
    return names


def transfer_state(
    old_state: Mapping[str, torch.Tensor],
    old_classes: Sequence[str],
    network: torch.nn.Module,
    new_classes: Sequence[str],
    head: Mapping[str, tuple[int, ...]],
) -> set[str]:
    """Copy an earlier network's weights into `network` (same architecture, maybe other classes).

    Tensors outside the `head` (from `head_dims`) are copied when their shapes agree. In the head,
    the slices of the classes both networks have (matched by name, background first) are copied
    along every class dimension; the other classes keep their fresh values. Returns the keys
    copied whole or in part.
    """
    new_state = network.state_dict()
    old_index = {name: k for k, name in enumerate(old_classes)}
    pairs = [(k, old_index[name]) for k, name in enumerate(new_classes) if name in old_index]
    transferred: set[str] = set()
    for key, fresh in new_state.items():
        old = old_state.get(key)
        if old is None or old.dim() != fresh.dim():
            continue
        class_dims = head.get(key, ())
        if not class_dims:
            if old.shape == fresh.shape:
                new_state[key] = old.clone()
                transferred.add(key)
            continue
        others_agree = all(old.shape[d] == fresh.shape[d] for d in range(fresh.dim()) if d not in class_dims)
        if not others_agree or not pairs:
            continue
        merged = fresh.clone()
        for combination in itertools.product(pairs, repeat=len(class_dims)):
            new_at: list[Any] = [slice(None)] * fresh.dim()
            old_at: list[Any] = [slice(None)] * fresh.dim()
            for d, (new_k, old_k) in zip(class_dims, combination, strict=True):
                new_at[d], old_at[d] = new_k, old_k
            merged[tuple(new_at)] = old[tuple(old_at)]
        new_state[key] = merged
        transferred.add(key)
    network.load_state_dict(new_state)
    return transferred
