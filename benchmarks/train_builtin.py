"""Train the built-in reference model `builtin:synthetic` and its trained selectors, from fixed seeds.

    python benchmarks/train_builtin.py                 # writes src/tokensieve/assets/synthetic/
    python benchmarks/train_builtin.py --out /tmp/ref  # anywhere else, to compare

What it does (every step seeded; the same files on the same machine and thread count):
1. Renders three synthetic sets with `make_synthetic`, all made with the same `SET` arguments and
   different seeds: the backbone's training set, the selectors' training set (a tiny backbone
   memorises its own clips, so on them it is right whichever tokens it gets and a selector trained
   there learns little) and the held-out set, which `tokensieve sweep` renders again on demand from
   the card (`tokensieve.assets.heldout`).
   The task: a small saturated object moves left, right, up or down (4 classes) during 1/4 to 1/2 of a
   16-frame 32x32 clip, and is in the scene only while it moves (`visible="action"`), on a soft
   textured background with 3 static distractors. About 3% of the tokens carry the label, in a few of
   the 8 temporal slices: which tokens a method keeps decides whether the model sees the object.
2. Trains a VideoMAE-layout ViT (8x4x4 tokens of tubelet 2 and 8x8 patches, width 96, depth 4, 4
   heads; 0.3 M parameters) from scratch on the decoded clips (kept in memory after the first epoch;
   no crops or flips: the direction is the label), first on 1000 of them, then on all (`STAGES`,
   whose comment says why).
3. Trains STTS's scorer (`stts:T0=0.5`, perturbed top-K with sigma decayed to 0) on the selectors' set
   with the backbone frozen, and keeps its weights (the sweep applies them at every T0).
4. Trains LITE's selector twice on the same set (the backbone frozen, BCE against the oracle computed
   on each step's clips): against the paper's oracle (Grad-CAM, `lite`) and against the gradient norm at
   the patch embedding (`lite:value=gradnorm,tensor=embed`), kept apart under their `weights_key`.
5. Trains TokenLearner (`TOKENLEARNER`: the released V1.1 with 8 tokens per slice at the middle, fewer
   tokens and earlier placements for lower budgets, the paper's V1, and both TokenFusers) on the same set
   the same way, the backbone frozen; each is kept under its `weights_key`.
6. Fine-tunes a copy of the whole model with HaltingVT's plan (`halting:beta=10,glimpser=0.5`: the
   Glimpser, halting, the ponder and Motion losses) on the same set; its weights go under the plan's
   `weights_key` ("halting") into `finetuned.safetensors`.
7. Evaluates everything on the held-out set and writes `model/` (`ts.save`), `selectors.safetensors`,
   `finetuned.safetensors`, `card.json` and `MODEL_CARD.md` into `--out`.

About 25 minutes on one CPU core (torch threads fixed at 1). `--selectors-only` keeps the backbone in
`--out` and redoes steps 3-7 (the backbone's training is deterministic: a full run rewrites the same
model). `--add tokenlearner` keeps every file and trains step 5 alone, adding its plans (3 minutes).
Float rounding differs between CPUs, so another machine reproduces the accuracies to within a clip or
two, not the last digits of the weights.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import logging
import platform
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

import tokensieve as ts
from tokensieve.data import VideoDataset, make_synthetic, read_list
from tokensieve.data.clips import ClipDataset
from tokensieve.reducers.plan import load_trained, trained_keys

ASSETS = Path(__file__).resolve().parents[1] / "src" / "tokensieve" / "assets" / "synthetic"
THREADS = 1  # the trajectory of a tiny ViT from scratch depends on the thread count: fix it

SET = dict(
    classes=4, frames=16, size=32, fps=8, partial=True, distractors=3, object_size=[1 / 3.5, 1 / 3],
    texture=0.4, returning=False, visible="action", patch=8, tubelet=2,
)  # fmt: skip
TRAIN_SET = dict(videos=4000, seed=1)
SELECTOR_SET = dict(videos=1000, seed=2)
HELDOUT_SET = dict(videos=400, seed=3)
BACKBONE = dict(
    preset="videomae-tiny", frames=16, size=32, patch=8, tubelet=2, dim=96, depth=4, heads=4, mlp_dim=192,
    num_classes=4, seed=0,
)  # fmt: skip
RECIPE = dict(batch_size=16, lr=5e-4, weight_decay=0.05, warmup_epochs=0.6, seed=0)
STAGES = ((1000, 16), (4000, 8))
"""(first N videos of the training set, epochs), each stage with its own warm-up and cosine. A tiny ViT
from scratch sits at the loss of chance (ln 4) until it finds the motion, and when it does is erratic:
in single-stage runs after about 950 steps on 1000 clips (82.8% held-out after 2500 steps, overfitted),
2400 on 4000 clips (65% after 4000), and not within 1500 steps at batch 32 and lr 1e-3. With these
stages the first (1000 steps) ends still at chance (27.8% held-out) and the second leaves it after
about 350 steps and ends at 96.2%; 40 epochs on the first 1000 clips alone end at 90.5%."""
STTS = dict(spec="stts:T0=0.5,sigma=0.1", epochs=5, batch_size=16, lr=1e-3, seed=0)
LITE = (
    dict(spec="lite:keep=0.5", epochs=5, batch_size=16, lr=1e-3, seed=0),
    dict(spec="lite:keep=0.5,value=gradnorm,tensor=embed", epochs=5, batch_size=16, lr=1e-3, seed=0),
)
"""The budget of a LITE spec only sets how many tokens the trained selector keeps: the sweep applies the
weights at every keep. The second target is the oracle that beats random on this model (docs/methods.md)."""
TOKENLEARNER = tuple(
    dict(spec=spec, epochs=5, batch_size=16, lr=1e-3, seed=0)
    for spec in (
        "tokenlearner", "tokenlearner:tokens=2", "tokenlearner:at=1,tokens=4", "tokenlearner:at=0,tokens=4",
        "tokenlearner:version=1", "tokenlearner:fuser=released", "tokenlearner:fuser=paper",
    )
)  # fmt: skip
"""TokenLearner's learned tokens are a structural setting (each count and placement its own weights), so
the sweep runs each spec once at its own cost: these are the ones it has weights for. The paper trains
TokenLearner with the network; here, as for the selectors, only its modules learn (the released V1.1
module and fuser are 6-7 k parameters each) and the backbone stays the shipped one."""
HALTING = dict(
    spec="halting:beta=10,glimpser=0.5", epochs=3, batch_size=16, optimizer="adamw", lr=1e-4, weight_decay=0.05,
    warmup_epochs=0.3, warmup_start=0.0, clip_grad=40.0, seed=0,
)  # fmt: skip
"""HaltingVT trains the whole model. The paper's recipe (`Halting.recipe`: Adam at 1e-5 from an ImageNet
DeiT) is for a pretrained 22 M-parameter model over many epochs; this 0.3 M model, trained here with AdamW
at 5e-4, is fine-tuned at a fifth of that rate for three epochs (one left halting alone, without the
Glimpser, below random; docs/methods.md). The batch doubles with the fake clips of the Motion Loss
(`motion=1`, the released weight)."""
CARD_PLANS = ("random:keep=0.5", "random:keep=0.25", "random:keep=0.1")
ORACLE_PLANS = ("oracle:keep=0.25", "oracle:keep=0.25,value=gradnorm,tensor=embed")


class InMemory(ClipDataset):
    """Clips decoded once and kept (as uint8): the sampling is fixed (the whole clip, no crop or flip),
    so every epoch sees the same clips and decoding them again would only cost time."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.cache: dict[int, torch.Tensor] = {}

    def load(self, index: int, generator: torch.Generator) -> torch.Tensor:
        if index not in self.cache:
            self.cache[index] = super().load(index, generator).mul(255).round().to(torch.uint8)
        return self.cache[index].float().div(255)


def render(root: Path, name: str, spec: dict) -> list:
    folder = root / name
    listed = folder / "list.txt"
    if not listed.is_file():
        make_synthetic(folder, **{**SET, "object_size": tuple(SET["object_size"])}, **spec)
    return read_list(listed)


def clips(records: list) -> InMemory:
    fixed = dict(
        frames=SET["frames"], size=SET["size"], stride=1, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip=False
    )
    return InMemory(records, **fixed, num_classes=SET["classes"])


def report(every: int):  # type: ignore[no-untyped-def]
    def show(info) -> None:  # type: ignore[no-untyped-def]
        if info.step % every == 0 or info.step == info.total_steps - 1:
            print(f"   step {info.step}/{info.total_steps}  loss {info.loss:.3f}", flush=True)

    return show


def top1(model: ts.VideoBackbone, data: VideoDataset, spec: str | None) -> float:
    kept = model.spec
    if spec != kept:
        ts.apply(model, spec)
    summary = ts.evaluate(model, data, batch_size=64, workers=0)
    return round(summary.top1, 4)


def train_selector(model: ts.VideoBackbone, records: list, setting: dict) -> dict[str, torch.Tensor]:
    """Train the learned reducer of `setting["spec"]` alone (the backbone frozen) from its seed and return
    its weights under `weights_key` ("<key>/<parameter>", the layout of selectors.safetensors)."""
    torch.manual_seed(setting["seed"])  # its initialisation: the same whatever ran before
    ts.apply(model, setting["spec"])
    settings = {k: v for k, v in setting.items() if k not in ("spec", "lr")}
    ts.train(model, clips(records), workers=0, freeze_backbone=True, lr=0.0, reducer_lr=setting["lr"],
             progress=report(50), **settings)  # fmt: skip
    key = trained_keys(model)[-1]
    return {f"{key}/{k}": v.detach().contiguous() for k, v in model.plan[-1].state_dict().items()}


def finetune(model: ts.VideoBackbone, records: list, setting: dict) -> dict[str, torch.Tensor]:
    """Fine-tune a copy of `model` with the plan of `setting["spec"]`, a method that trains with the whole
    model (`Reducer.trains_backbone`: HaltingVT), from its seed; return the copy's weights (backbone and
    plan) under the plan's `weights_key` ("<key>/<model key>", the layout of finetuned.safetensors)."""
    tuned = copy.deepcopy(model)
    torch.manual_seed(setting["seed"])
    ts.apply(tuned, setting["spec"])
    settings = {k: v for k, v in setting.items() if k != "spec"}
    ts.train(tuned, clips(records), workers=0, progress=report(50), **settings)
    key = trained_keys(tuned)[-1]
    return {f"{key}/{k}": v.detach().contiguous() for k, v in tuned.state_dict().items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ASSETS, help="where the model, selectors and card go")
    parser.add_argument(
        "--work", type=Path, default=None, help="keep the rendered sets here (default: a temp dir)"
    )
    parser.add_argument(
        "--selectors-only", action="store_true", help="keep the backbone in --out; train the selectors again"
    )
    parser.add_argument(
        "--add", choices=["tokenlearner"], default=None,
        help="keep every file in --out and train this method's plans alone, adding them",
    )  # fmt: skip
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(THREADS)
    began = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        print("1. rendering the sets", flush=True)
        train_records = render(work, "train", TRAIN_SET)
        selector_records = render(work, "selector", SELECTOR_SET)
        heldout = VideoDataset(render(work, "heldout", HELDOUT_SET), frames=SET["frames"], size=SET["size"],
                               stride=1, num_classes=SET["classes"])  # fmt: skip

        if args.add:
            add_tokenlearner(args.out, selector_records, heldout)
            return
        if args.selectors_only:
            print("2. the backbone in --out", flush=True)
            model = ts.load(str(args.out / "model"))
            kept = json.loads((args.out / "card.json").read_text())["recipe"]
            steps, backbone_seconds = kept["steps"], kept["seconds"]
            began = time.perf_counter() - backbone_seconds  # the card's time is a full run's
        else:
            print("2. training the backbone", flush=True)
            model, steps = train_backbone(train_records, heldout)
            backbone_seconds = time.perf_counter() - began

        accuracy = {"none": top1(model, heldout, None)}
        gflops: dict[str, float] = {}  # per clip (of an adaptive plan: the mean over the clips)
        print(f"   held-out top-1 with all tokens: {100 * accuracy['none']:.1f}%", flush=True)
        for spec in CARD_PLANS:
            accuracy[spec] = top1(model, heldout, spec)
        ts.apply(model, None)

        print("3. training the STTS scorer (backbone frozen)", flush=True)
        selectors = train_selector(model, selector_records, STTS)
        accuracy[STTS["spec"]] = top1(model, heldout, STTS["spec"])
        for spec in ("uniform:keep=0.5", "random_frames:keep=0.5"):
            accuracy[spec] = top1(model, heldout, spec)
        print("4. training LITE's selectors (backbone frozen)", flush=True)
        for setting in LITE:
            print(f"   {setting['spec']}", flush=True)
            trained = train_selector(model, selector_records, setting)
            selectors.update(trained)
            for keep in (0.5, 0.25):
                spec = setting["spec"].replace("keep=0.5", f"keep={keep}")
                ts.apply(model, spec)
                assert not load_trained(model, _by_key(trained))
                accuracy[spec] = top1(model, heldout, spec)
        for spec in ORACLE_PLANS:
            accuracy[spec] = top1(model, heldout, spec)
        ts.apply(model, None)

        print("5. training TokenLearner (backbone frozen)", flush=True)
        selectors.update(train_tokenlearner(model, selector_records, heldout, accuracy, gflops))

        print(f"6. fine-tuning the whole model with {HALTING['spec']}", flush=True)
        finetuned = finetune(model, selector_records, HALTING)
        tuned = copy.deepcopy(model)
        for spec in (HALTING["spec"], HALTING["spec"] + ",halted=zero"):
            ts.apply(tuned, spec)
            assert not load_trained(tuned, _by_key(finetuned))
            summary = ts.evaluate(tuned, heldout, batch_size=64, workers=0)
            accuracy[spec] = round(summary.top1, 4)
            gflops[spec] = round(summary.gflops_per_view, 6)

        args.out.mkdir(parents=True, exist_ok=True)
        ts.save(model, args.out / "model")
        save_file(selectors, str(args.out / "selectors.safetensors"))
        save_file(finetuned, str(args.out / "finetuned.safetensors"))
        for name in ("selectors.safetensors", "finetuned.safetensors"):
            (args.out / name).chmod(0o644)  # package data: readable by everyone
        seconds = time.perf_counter() - began
        card = {
            "name": "builtin:synthetic",
            "made": datetime.date.today().isoformat(),
            "made_with": _made_with(),
            "seconds": round(seconds),
            "backbone": BACKBONE,
            "parameters": model.num_params,
            "gflops": round(float(ts.flops(model)), 6),
            "set": SET,
            "train": TRAIN_SET,
            "selector_train": SELECTOR_SET,
            "heldout": {**SET, **HELDOUT_SET},
            "recipe": {**RECIPE, "stages": STAGES, "steps": steps, "seconds": round(backbone_seconds)},
            "selectors": {"stts": {**STTS}, "lite": list(LITE), "tokenlearner": list(TOKENLEARNER)},
            "finetuned": {"halting": {**HALTING}},
            "heldout_top1": accuracy,
            "heldout_gflops": gflops,
        }
        (args.out / "card.json").write_text(json.dumps(card, indent=2) + "\n")
        (args.out / "MODEL_CARD.md").write_text(model_card(card))
        print(json.dumps(accuracy, indent=2))
        print(f"wrote {args.out} in {seconds / 60:.1f} min", flush=True)


def train_tokenlearner(
    model: ts.VideoBackbone, records: list, heldout: VideoDataset, accuracy: dict, gflops: dict
) -> dict[str, torch.Tensor]:
    """Every setting of `TOKENLEARNER` trained alone on `model` (frozen), its held-out top-1 and GFLOPs put in
    `accuracy` and `gflops`; returns their weights under their `weights_key`s."""
    found: dict[str, torch.Tensor] = {}
    for setting in TOKENLEARNER:
        print(f"   {setting['spec']}", flush=True)
        found.update(train_selector(model, records, setting))
        accuracy[setting["spec"]] = top1(model, heldout, setting["spec"])
        gflops[setting["spec"]] = round(float(ts.flops(model)), 6)
    ts.apply(model, None)
    return found


def add_tokenlearner(out: Path, records: list, heldout: VideoDataset) -> None:
    """`--add tokenlearner`: TokenLearner's plans trained on the backbone in `out` and added to its
    selectors.safetensors and card, every other file and row as it was (retraining them on another CPU
    would change their last digits: float rounding differs between machines). The card says where the
    added plans were made (`added`)."""
    began = time.perf_counter()
    print("2. the backbone in --out", flush=True)
    model = ts.load(str(out / "model"))
    card = json.loads((out / "card.json").read_text())
    selectors = {k: v for k, v in load_file(str(out / "selectors.safetensors")).items()
                 if not k.startswith("tokenlearner")}  # fmt: skip
    print("5. training TokenLearner (backbone frozen)", flush=True)
    accuracy: dict[str, float] = {}
    gflops: dict[str, float] = {}
    selectors.update(train_tokenlearner(model, records, heldout, accuracy, gflops))
    save_file(selectors, str(out / "selectors.safetensors"))
    (out / "selectors.safetensors").chmod(0o644)

    def merged(rows: dict, new: dict) -> dict:  # the new rows where a full run puts them: before halting
        kept = {k: v for k, v in rows.items() if not k.startswith("tokenlearner")}
        return {**{k: v for k, v in kept.items() if not k.startswith("halting")}, **new,
                **{k: v for k, v in kept.items() if k.startswith("halting")}}  # fmt: skip

    card["selectors"]["tokenlearner"] = list(TOKENLEARNER)
    card["heldout_top1"] = merged(card["heldout_top1"], accuracy)
    card["heldout_gflops"] = merged(card.get("heldout_gflops", {}), gflops)
    card.setdefault("added", {})["tokenlearner"] = {
        "made": datetime.date.today().isoformat(),
        "made_with": _made_with(),
        "seconds": round(time.perf_counter() - began),
    }
    (out / "card.json").write_text(json.dumps(card, indent=2) + "\n")
    (out / "MODEL_CARD.md").write_text(model_card(card))
    print(json.dumps(accuracy, indent=2))
    print(f"added TokenLearner's plans to {out}", flush=True)


def _made_with() -> str:
    return (
        f"benchmarks/train_builtin.py, torch {torch.__version__}, {THREADS} threads, "
        f"python {platform.python_version()}, {_cpu()}"
    )


def train_backbone(records: list, heldout: VideoDataset) -> tuple[ts.VideoBackbone, int]:
    """The backbone trained from its seed in `STAGES`; returns it and its optimisation steps."""
    changes = {k: v for k, v in BACKBONE.items() if k not in ("preset", "seed")}
    torch.manual_seed(BACKBONE["seed"])
    model = ts.build(BACKBONE["preset"], **changes)
    steps = 0
    for count, epochs in STAGES:
        print(f"   {epochs} epochs on {count} videos", flush=True)
        steps += ts.train(model, clips(records[:count]), workers=0, progress=report(100), epochs=epochs,
                          **RECIPE).steps  # fmt: skip
        print(f"   held-out top-1: {100 * top1(model, heldout, None):.1f}%", flush=True)
    return model, steps


def _by_key(flat: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """ "<key>/<parameter>" -> {key: {parameter: tensor}} (what `load_trained` takes)."""
    found: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in flat.items():
        key, _, param = name.partition("/")
        found.setdefault(key, {})[param] = tensor
    return found


def _cpu() -> str:
    from tokensieve.engine.sweep import _cpu as cpu

    return cpu()


def model_card(card: dict) -> str:
    acc = card["heldout_top1"]
    gflops = card.get("heldout_gflops", {})
    tl = card["selectors"]["tokenlearner"]
    added = "".join(
        f" The {method} plans were added later (`--add {method}`, {part['made']}, {part['made_with']})."
        for method, part in card.get("added", {}).items()
    )
    rows = "\n".join(
        f"| `{spec}` | {100 * value:.1f} | {f'{gflops[spec]:.4f}' if spec in gflops else ''} |"
        for spec, value in acc.items()
    )
    b, r, h = card["backbone"], card["recipe"], card["finetuned"]["halting"]
    return f"""# builtin:synthetic — the reference model of `tokensieve sweep`

A VideoMAE-layout video ViT trained from scratch on tokensieve's synthetic benchmark, shipped so that
`tokensieve sweep` answers "which method beats random tokens?" on a fresh CPU machine with no download.
Load it with `ts.load("builtin:synthetic")`; its held-out set is rendered on demand
(`tokensieve.assets.heldout`). Reproduce every file here with `python benchmarks/train_builtin.py`
({card["seconds"] / 60:.0f} minutes; {card["made_with"]}).

## Task
{card["set"]["classes"]} classes (moving left, right, up, down) of a small saturated object that is in the scene only
while it moves, during 1/4 to 1/2 of each {card["set"]["frames"]}-frame {card["set"]["size"]}x{card["set"]["size"]} clip, on a soft texture with
{card["set"]["distractors"]} static distractors (`make_synthetic` arguments in card.json: `set`). Chance is 25%.
Few tokens carry the label, in a few temporal slices: what a method keeps decides what the model sees.

## Model
`{b["preset"]}` changed to {b["frames"]} frames of {b["size"]}x{b["size"]}, tubelet {b["tubelet"]}, patch {b["patch"]} (8x4x4 = 128 tokens),
width {b["dim"]}, depth {b["depth"]}, {b["heads"]} heads, MLP {b["mlp_dim"]}: {card["parameters"] / 1e6:.2f} M parameters,
{card["gflops"]} GFLOPs per clip. Initialised from seed {b["seed"]}.

## Training
{card["train"]["videos"]} videos rendered with seed {card["train"]["seed"]}, whole clips, no crop or flip; AdamW in stages
of (first videos, epochs) {r["stages"]} ({r["steps"]} steps in all) of batch {r["batch_size"]}, each with lr {r["lr"]},
{r["warmup_epochs"]} warm-up epoch and cosine decay, weight decay {r["weight_decay"]}. STTS's scorer (`{card["selectors"]["stts"]["spec"]}`): {card["selectors"]["stts"]["epochs"]} epochs on
{card["selector_train"]["videos"]} other videos (seed {card["selector_train"]["seed"]}), backbone frozen, lr {card["selectors"]["stts"]["lr"]}. LITE's selector, on the same videos
and the same way ({card["selectors"]["lite"][0]["epochs"]} epochs, lr {card["selectors"]["lite"][0]["lr"]}), twice: against the paper's Grad-CAM oracle
(`{card["selectors"]["lite"][0]["spec"]}`) and against the gradient norm at the patch embedding
(`{card["selectors"]["lite"][1]["spec"]}`); the weights are kept apart by their oracle parameters.
TokenLearner, on the same videos and the same way (its modules alone, {tl[0]["epochs"]} epochs, lr {tl[0]["lr"]}), in {len(tl)} settings,
each its own weights: {", ".join(f"`{t['spec']}`" for t in tl)}.{added}
HaltingVT (`{h["spec"]}`) trains the whole model: a copy fine-tuned on the same {card["selector_train"]["videos"]} videos for
{h["epochs"]} epochs with its losses (ponder, Motion Loss with a fake clip per clip), {h["optimizer"]} at lr {h["lr"]}, batch
{h["batch_size"]}, {h["warmup_epochs"]} warm-up epoch, gradient clipping at {h["clip_grad"]}; its weights (`finetuned.safetensors`) replace
the model's when the sweep runs that plan.

## Held-out accuracy
{card["heldout"]["videos"]} videos (seed {card["heldout"]["seed"]}), one view each (the whole clip):

| plan | top-1 % | GFLOPs per clip (halting: the mean over the clips) |
| --- | ---: | ---: |
{rows}

Tests (`tests/test_assets.py`) check the `none`, STTS and halting rows against these files.
"""


if __name__ == "__main__":
    main()
