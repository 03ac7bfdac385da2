"""Run with the old tool's python (salt-ml): its GN2 on the first jets of a file, saved for
`compare_with_salt.py --equivalence`, which loads the same weights into ours and compares;
or its training speed, for `compare_with_salt.py --speed`.

    <old venv>/bin/python scripts/old_tool_reference.py SETTINGS.json OUT.pt
    <old venv>/bin/python scripts/old_tool_reference.py --speed SETTINGS.json

With --speed, SETTINGS.json also holds "batch_size", "steps" and "warmup": fp32 training
steps (forward, backward, AdamW) on consecutive batches of the file's first jets, as the old
tool's loader gives them (every track slot of the file, padded ones included); prints one JSON
line with jets/s over the timed steps. Only the model's step is timed (the old tool's loader
and Lightning add to that in real training): a lower bound on its time per jet.

SETTINGS.json: {"file", "norm_dict", "class_dict", "num_jets", "seed", "model": {sizes},
"jet_variables", "track_variables"}. OUT.pt: the state dict, the per-task losses, the jet
logits and every parameter's gradient of the summed loss, all from one fp64 forward/backward.
This file never imports this repository's `salt`: `salt` here is the old tool.
"""

from __future__ import annotations

import json
import sys
import time

import h5py
import numpy as np
import torch
import yaml
from numpy.lib.recfunctions import structured_to_unstructured

from salt.models import (
    ClassificationTask,
    GlobalAttentionPooling,
    InputNorm,
    SaltModel,
    Transformer,
    VertexingTask,
)


def build(settings: dict) -> tuple[SaltModel, InputNorm]:
    m = settings["model"]
    variables = {"jets": settings["jet_variables"], "tracks": settings["track_variables"]}
    with open(settings["class_dict"]) as f:
        class_dict = yaml.safe_load(f)
    dense = {"hidden_layers": m["head_hidden"], "activation": m["activation"]}
    tasks = torch.nn.ModuleList(
        [
            ClassificationTask(
                name="jets_classification",
                input_name="jets",
                label="flavour_label",
                class_names=["bjets", "cjets", "ujets", "taujets"],
                loss=torch.nn.CrossEntropyLoss(
                    weight=torch.tensor(class_dict["jets"]["flavour_label"], dtype=torch.float32)
                ),
                dense_config={**dense, "input_size": m["out_dim"], "output_size": 4},
            ),
            ClassificationTask(
                name="track_origin",
                input_name="tracks",
                label="ftagTruthOriginLabel",
                class_names=[f"origin{i}" for i in range(8)],
                weight=0.5,
                loss=torch.nn.CrossEntropyLoss(
                    weight=torch.tensor(
                        class_dict["tracks"]["ftagTruthOriginLabel"], dtype=torch.float32
                    )
                ),
                dense_config={
                    **dense,
                    "input_size": m["out_dim"],
                    "output_size": 8,
                    "context_size": m["out_dim"],
                },
            ),
            VertexingTask(
                name="track_vertexing",
                input_name="tracks",
                label="ftagTruthVertexIndex",
                weight=1.5,
                loss=torch.nn.BCEWithLogitsLoss(reduction="none"),
                dense_config={
                    **dense,
                    "input_size": 2 * m["out_dim"],
                    "output_size": 1,
                    "context_size": m["out_dim"],
                },
            ),
        ]
    )
    model = SaltModel(
        init_nets=[
            {
                "input_name": "tracks",
                "dense_config": {
                    "output_size": m["embed_dim"],
                    "hidden_layers": [m["init_hidden"]],
                    "activation": m["activation"],
                },
                "variables": variables,
                "global_object": "jets",
            }
        ],
        tasks=tasks,
        encoder=Transformer(
            num_layers=m["num_layers"],
            embed_dim=m["embed_dim"],
            out_dim=m["out_dim"],
            attn_type="torch-math",
            norm="LayerNorm",
            do_final_norm=True,
            dense_kwargs={"activation": m["activation"], "gated": False},
            attn_kwargs={"num_heads": m["num_heads"]},
        ),
        pool_net=GlobalAttentionPooling(m["out_dim"]),
    )
    model.global_object = "jets"  # what its ModelWrapper sets
    for task in tasks:
        task.global_object = "jets"
    norm = InputNorm(settings["norm_dict"], variables, "jets", {"jets": "jets", "tracks": "tracks"})
    return model, norm


def load_batch(settings: dict) -> tuple[dict, dict, dict]:
    """The first jets as the old tool's dataset reads them (raw values, padded slots 0)."""
    n = settings["num_jets"]
    with h5py.File(settings["file"], "r") as f:
        jets, tracks = f["jets"][:n], f["tracks"][:n]

    def flat(array: np.ndarray, names: list[str]) -> torch.Tensor:
        return torch.from_numpy(structured_to_unstructured(array[names], dtype=np.float32))

    pad = ~torch.from_numpy(tracks["valid"].astype(bool))
    x_tracks = flat(tracks, settings["track_variables"])
    x_tracks[pad] = 0
    inputs = {"jets": flat(jets, settings["jet_variables"]), "tracks": x_tracks}
    labels = {
        "jets": {"flavour_label": torch.from_numpy(jets["flavour_label"].astype(np.int64))},
        "tracks": {
            k: torch.from_numpy(tracks[k].astype(np.int64))
            for k in ("ftagTruthOriginLabel", "ftagTruthVertexIndex")
        },
    }
    return inputs, {"tracks": pad}, labels


def speed(settings: dict) -> dict:
    """Timed fp32 training steps of the old tool's GN2 (see the module docstring)."""
    batch, steps, warmup = settings["batch_size"], settings["steps"], settings["warmup"]
    settings = {**settings, "num_jets": batch * (steps + warmup)}
    torch.manual_seed(settings["seed"])
    model, norm = build(settings)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=1e-5)
    inputs, pad_masks, labels = load_batch(settings)
    inputs = norm(inputs)

    def part(tree: dict, i: int) -> dict:
        return {
            k: part(v, i) if isinstance(v, dict) else v[i * batch : (i + 1) * batch]
            for k, v in tree.items()
        }

    model.train()
    for i in range(steps + warmup):
        if i == warmup:
            start = time.perf_counter()
        _, losses = model(part(inputs, i), part(pad_masks, i), part(labels, i))
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()
    seconds = time.perf_counter() - start
    return {"jets_per_s": batch * steps / seconds, "threads": torch.get_num_threads()}


def main() -> int:
    if sys.argv[1] == "--speed":
        with open(sys.argv[2]) as f:
            print(json.dumps(speed(json.load(f))))
        return 0
    with open(sys.argv[1]) as f:
        settings = json.load(f)
    torch.manual_seed(settings["seed"])
    model, norm = build(settings)
    model, norm = model.double(), norm.double()
    inputs, pad_masks, labels = load_batch(settings)
    inputs = norm({k: v.double() for k, v in inputs.items()})
    preds, losses = model(inputs, dict(pad_masks), labels)
    total = sum(losses.values())
    total.backward()
    torch.save(
        {
            "state_dict": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "losses": {k: float(v) for k, v in losses.items()},
            "jet_logits": preds["jets"]["jets_classification"].detach(),
            "grads": {k: p.grad.clone() for k, p in model.named_parameters()},
        },
        sys.argv[2],
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
