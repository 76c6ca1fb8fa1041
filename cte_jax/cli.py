"""The `cte-jax` command: parses arguments and calls the library; user errors print one line, exit 2."""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import os
import sys
import tempfile
import textwrap
from collections import Counter
from pathlib import Path
from typing import Callable, Sequence

from cte_jax.errors import CTEError
from cte_jax.files import as_if_created

DEMO = Path(__file__).resolve().parent / "demo"
EXIT_USAGE = 2

RANK_HELP = """\
Rank a bank of segmentation models for an unlabelled target by consistency (CTE).

Each model predicts every target image twice, clean and perturbed; the more its two predictions
agree (CTE-NHD: IoU of the two foreground masks; CTE-EI: confidence-weighted agreement;
CTE-VRand: Rand F-score of the two instance segmentations), the better it is expected to
transfer. The median over images ranks the models, best first.

Two simple baselines can be ranked beside CTE from the same clean pass, for comparison:
confidence (mean probability over the predicted foreground) and entropy (1 - mean binary
entropy). In our leave-one-domain-out nuclei study (benchmarks/RESULTS.md, twelve models of one
bottleneck shape trained to convergence), Spearman against F1 was 0.77 for CTE-NHD, 0.74 for
CTE-EI, 0.70 for confidence and 0.44 for entropy; with models trained a third as long, CTE-EI
(0.77) and confidence (0.73) were ahead of CTE-NHD (0.69). So compute --metric nhd ei and compare
before you trust a close call.
The "vs next" column says which calls are close: below 0.95, another draw of target images
could well swap a model and the next one down. Give it tens of images: below 20 the table says
so (a 4-image target ranked our study's bank wrong-signed).

Bottleneck dropout perturbs models of different depth or width by different amounts: in that
study CTE-NHD ranked a narrow (8-16-32) model 2.2 places below its true place on average, though
it was trained as long as the others, and with it and a 4-level model in the bank Spearman fell
from 0.74 to 0.66. When the bank mixes architectures, the table says so;
compare within one architecture.

With no arguments, ranks the demo bank shipped with cte_jax on its demo target (DSB2018 nuclei).

examples:
  cte-jax rank
  cte-jax rank --bank my_bank/ --target images/ --perturbation dropout:0.1
  cte-jax rank --bank my_bank/ --target stack.tif --metric vrand --json ranking.json
  cte-jax rank --bank my_bank/ --target images/ --metric nhd entropy
  cte-jax rank --bank my_bank/ --target data.zarr --perturbation dropout:0.05 dropout:0.1 dropout:0.2
"""

PERT_HELP = ("perturbation(s), KIND:VALUE or KIND:LO-HI (strength drawn per image): dropout:P (spatial "
             "dropout at the bottleneck, grey-box models), noise:SIGMA, brightness:DELTA, contrast:FACTOR, "
             "gamma:GAMMA; several form a sweep sharing the clean pass (default: dropout:0.1)")


def _atomic_write(path: str | os.PathLike, write: Callable[[io.TextIOBase | Path], None], *, binary_path: bool = False):
    """Write ``path`` through a temporary sibling renamed at the end, so a failure leaves nothing."""
    path = Path(path)
    if not path.parent.exists():
        raise CTEError("output folder does not exist", path.parent)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        as_if_created(tmp)
        if binary_path:
            write(Path(tmp))
        else:
            with open(tmp, "w", newline="") as f:
                write(f)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


BASELINE_TITLES = {"confidence": "baseline: mean confidence (clean pass; for comparison)",
                   "entropy": "baseline: 1 - mean entropy (clean pass; for comparison)"}


def _note(text: str) -> list[str]:
    """A note under rank's tables: a blank line, then the text wrapped at 100 columns."""
    return ["", *textwrap.wrap(f"note: {text}", 100)]


def _architecture_note(records: list[dict]) -> list[str]:
    """A warning under a feature-perturbation table whose scored models differ in architecture."""
    counts = Counter(r["architecture"] for r in records if r.get("architecture") and r["score"] is not None)
    if len(counts) < 2:
        return []
    mix = ", ".join(f"{a} ({n})" for a, n in counts.most_common())
    text = (f"bottleneck dropout is not equally strong for every architecture, and these models "
            f"have {len(counts)} architectures (channels per level, with the number of models: {mix}). In our "
            f"nuclei study, with every model trained to convergence, CTE-NHD ranked a narrower 3-level model 2.2 places below its true place on "
            f"average and a 4-level model 1.3 places above it (benchmarks/RESULTS.md). Compare scores within "
            f"one architecture and training length, or check the order with --metric ei, which moved those "
            f"models less.")
    return _note(text)


SMALL_TARGET = 20  # images; below it `rank` says the ranking rests on too few


def _small_target_note(records: list[dict]) -> list[str]:
    """A warning when the ranked models were scored on fewer than SMALL_TARGET images."""
    counts = [r["n_images"] for r in records if r.get("score") is not None and "n_images" in r]
    return _few_images_note(max(counts)) if counts else []


def _few_images_note(n: int) -> list[str]:
    if n >= SMALL_TARGET:
        return []
    text = (f"the scores rest on {n} image{'s' if n != 1 else ''}. Consistency differences between good "
            f"models are small, and with fewer than {SMALL_TARGET} images the order can change with the "
            f"images (and the --seed): in our nuclei study a 4-image target ranked the bank wrong-signed. "
            f"Use tens of images if you can.")
    return _note(text)


def _unscored_note(records: list[dict]) -> list[str]:
    """A word on models left without a score (a black box under dropout has its own note)."""
    empty = sorted({r["model"] for r in records if r["score"] is None and not r.get("note") and r.get("n_skipped")})
    if not empty:
        return []
    text = (f"{len(empty)} model{'s' if len(empty) != 1 else ''} ({', '.join(empty[:5])}"
            f"{', ...' if len(empty) > 5 else ''}) have no score under some perturbation: on every image both "
            f"predictions were empty (no pixel above the threshold), so there was nothing to compare. Blank images, "
            f"or images unlike the models' training data, do this.")
    return _note(text)


def _flag_note(records: list[dict]) -> list[str]:
    """A warning when most (more than half) of the models with a foreground fraction are flagged."""
    from cte_jax.evaluate import is_flagged

    fg = {r["model"]: is_flagged(r) for r in records if "foreground_fraction" in r}
    n = sum(fg.values())
    if not fg or 2 * n <= len(fg):
        return []
    text = (f"{n} of {len(fg)} models are flagged for their foreground fraction. A bank mostly "
            f"flagged on a target was probably not made for images like these (for example fluorescence "
            f"models on stained tissue, where they segment the background and look very consistent); its "
            f"ranking there is not to be trusted.")
    return _note(text)


def _flagged_first_line(rs: list[dict]) -> list[str]:
    """Under a table whose first-ranked model is flagged: which unflagged model ranks highest."""
    from cte_jax.evaluate import is_flagged

    ranked = sorted((r for r in rs if r["rank"] is not None), key=lambda r: r["rank"])
    if not ranked or not is_flagged(ranked[0]):
        return []
    ok = next((r for r in ranked if not is_flagged(r)), None)
    if ok is None:
        return ["  (every ranked model is flagged: see the note below)"]
    return [f"  (rank 1 is flagged; the best-ranked unflagged model is {ok['model']}, rank {ok['rank']})"]


def _table(records: list[dict], aggregate: str = "median") -> str:
    from cte_jax.perturbations import parse_perturbation
    from cte_jax.ranking import ORDER_MIN_RESAMPLES, ORDER_RESAMPLES, ORDER_SURE

    lines, arch_note = [], []
    keys = []
    for r in records:
        # A baseline uses the clean pass only: its scores repeat under every perturbation.
        k = ("", r["metric"]) if r["metric"] in BASELINE_TITLES else (r["perturbation"], r["metric"])
        if k not in keys:
            keys.append(k)
    keys = [k for k in keys if k[0]] + [k for k in keys if not k[0]]  # baselines last
    width = max([len(r["model"]) for r in records] + [5])
    for pert, metric in keys:
        if metric in BASELINE_TITLES:
            first = next(r["perturbation"] for r in records if r["metric"] == metric)
            rs = [r for r in records if (r["perturbation"], r["metric"]) == (first, metric)]
            lines.append(f"\n{BASELINE_TITLES[metric]}")
        else:
            rs = [r for r in records if (r["perturbation"], r["metric"]) == (pert, metric)]
            lines.append(f"\nCTE-{metric.upper()} under {pert}")
        lines.append(f"{'rank':>4}  {'model':<{width}}  {'score':>7}  {'vs next':>7}  {'scored':>6}  {'skipped':>7}  "
                     f"{'fg':>6}")
        for r in rs:
            score = "-" if r["score"] is None else f"{r['score']:.4f}"
            rank = "-" if r["rank"] is None else str(r["rank"])
            fg = f"{r['foreground_fraction']:.3f}" if "foreground_fraction" in r else "-"
            support = "-" if r.get("order_support") is None else f"{r['order_support']:.2f}"
            notes = [r["note"]] if r.get("note") else []
            if r.get("low_foreground"):
                notes.append("predicts far less foreground than the bank: its consistency may be unreliable")
            if r.get("high_foreground"):
                notes.append("predicts most of the image as foreground (wrong polarity?): its consistency may be unreliable")
            note = "".join(f"  [{n}]" for n in notes)
            lines.append(f"{rank:>4}  {r['model']:<{width}}  {score:>7}  {support:>7}  {r['n_scored']:>6}  "
                         f"{r['n_skipped']:>7}  {fg:>6}{note}")
        lines += _flagged_first_line(rs)
        if pert and parse_perturbation(pert).is_feature and not arch_note:
            arch_note = _architecture_note(rs)
    lines += arch_note + _flag_note(records) + _unscored_note(records) + _small_target_note(records)
    baseline = ", or baseline score (higher = expected to transfer better)" if any(not p for p, _ in keys) else ""
    lines.append(f"\nscore: {aggregate} per-image consistency (1 = perfectly consistent){baseline}; fg: median "
                 "fraction of pixels predicted foreground")
    if not any(r.get("order_support") is not None for r in records):  # one image or one model: nothing resampled
        return "\n".join(lines).lstrip("\n")
    lines += textwrap.wrap(
        f"vs next: share of {ORDER_RESAMPLES} resamples of the target's images (at least {ORDER_MIN_RESAMPLES} "
        f"on very large targets) in which the model still scores above the next one down. Below "
        f"{ORDER_SURE} the two are a close call: in our nuclei study such neighbours were in the order of "
        f"their true performance only about half the time.", 100)
    return "\n".join(lines).lstrip("\n")


RECORD_FIELDS = ["model", "perturbation", "metric", "score", "rank", "n_scored", "n_skipped", "n_images",
                 "foreground_fraction", "low_foreground", "high_foreground", "architecture", "order_support"]


def _file_records(records: list[dict]) -> list[dict]:
    """The records as --json/--csv write them: a clean-pass baseline (confidence, entropy) once per
    model, with perturbation None, instead of repeated under every perturbation it never used."""
    from cte_jax.engine import CLEAN_METRICS

    out, seen = [], set()
    for r in records:
        if r["metric"] in CLEAN_METRICS:
            if (r["model"], r["metric"]) in seen:
                continue
            seen.add((r["model"], r["metric"]))
            r = {**r, "perturbation": None}
        out.append(r)
    return out


def _write_json(records, path, settings: dict):
    doc = {"format": "cte_jax.ranking", "version": 1, "settings": settings, "records": _file_records(records)}
    _atomic_write(path, lambda f: json.dump(doc, f, indent=2) or f.write("\n"))


def _write_csv(records, path):
    def write(f):
        w = csv.DictWriter(f, fieldnames=RECORD_FIELDS, extrasaction="ignore")
        w.writeheader()
        w.writerows(_file_records(records))

    _atomic_write(path, write)


def _check_out(path: str | None, suffixes: Sequence[str]):
    if path is None:
        return
    p = Path(path)
    if p.suffix.lower() not in suffixes:
        raise CTEError(f"output must end in {' or '.join(suffixes)}", p)
    if not p.parent.exists():
        raise CTEError("output folder does not exist", p.parent)
    try:  # found now, not after the whole run: the file is written through a temporary one there
        tempfile.TemporaryFile(dir=p.parent).close()
    except OSError as e:
        raise CTEError(f"cannot write in the output folder ({e.strerror or e})", p.parent) from None


def _check_perturbations(texts: Sequence[str]):
    """Refuse a perturbation that changes nothing: every model would score as perfectly consistent."""
    from cte_jax.perturbations import parse_perturbation

    for text in texts:
        try:
            pert = parse_perturbation(text)
        except ValueError as e:
            raise CTEError(str(e)) from None
        if pert.is_identity:
            raise CTEError(f"perturbation {text} leaves every image as it is, so every model would score as "
                           f"perfectly consistent; give it a strength (e.g. dropout:0.1, noise:0.01-0.03, "
                           f"brightness:0.1, contrast:0.8, gamma:1.2)")


def _warn_if_labels(target, dataset) -> None:
    """Before a long run: say so when the target's first images look like label masks."""
    from cte_jax import data

    try:
        change = data.looks_like_labels(data.open_target(target, dataset=dataset))
    except CTEError:
        return  # rank reports a bad target itself
    if change is not None:
        text = (f"warning: {target}: these images look like label masks: inside their foreground, "
                f"neighbouring pixels differ in {change:.1%} of places (raw microscopy: most). rank takes the "
                f"raw images (images/, not labels/).")
        print("\n".join(textwrap.wrap(text, 100)), file=sys.stderr, flush=True)


def cmd_rank(args) -> int:
    from cte_jax.ranking import rank

    _check_perturbations(args.perturbation)
    bank = args.bank or DEMO / "bank"
    target = args.target or DEMO / "target"
    _check_out(args.json, [".json"])
    _check_out(args.csv, [".csv"])
    _check_out(args.results, [".jsonl"])
    results = args.results
    if results is None and (args.json or args.csv):
        from cte_jax.results import default_results_path

        results = default_results_path(args.json or args.csv)
    if args.resume and results is None:
        raise CTEError("--resume needs --results FILE, or the --json/--csv of the interrupted run")
    if args.resume and args.overwrite:
        raise CTEError("--resume continues the results file, --overwrite discards it: give one of them")
    if args.devices is not None and args.devices < 1:
        raise CTEError("--devices must be at least 1")
    process = 0
    if args.distributed:
        from cte_jax.parallel import initialize_distributed

        process, _ = initialize_distributed(coordinator=args.coordinator, num_processes=args.num_processes,
                                            process_id=args.process_id, timeout=args.timeout)
    elif args.coordinator or args.num_processes is not None or args.process_id is not None:
        raise CTEError("--coordinator, --num-processes and --process-id go with --distributed")
    if process == 0:
        _warn_if_labels(target, args.dataset)
    records = rank(bank, target, perturbations=args.perturbation, metrics=args.metric, aggregate=args.aggregate,
                   seed=args.seed, batch_size=args.batch_size, strategy=args.strategy, precision=args.precision,
                   threshold=args.threshold, tile_above=args.tile_above, progress=not args.quiet and process == 0,
                   dataset=args.dataset, results=results, resume=args.resume, overwrite=args.overwrite,
                   devices=args.devices, shard=args.shard)
    if process != 0:  # process 0 prints and writes the gathered result
        return 0
    # files first: a reader that stops early (`| head`) must not cost them
    if args.json:
        from cte_jax import __version__
        from cte_jax.engine import DRAWS

        settings = {"cte_jax": __version__, "bank": str(Path(bank).resolve()), "target": str(Path(target).resolve()),
                    "dataset": args.dataset, "perturbations": list(args.perturbation), "metrics": list(args.metric),
                    "aggregate": args.aggregate, "seed": args.seed, "draws": DRAWS, "threshold": args.threshold,
                    "precision": args.precision, "tile_above": args.tile_above}
        _write_json(records, args.json, settings)
    if args.csv:
        _write_csv(records, args.csv)
    print(_table(records, args.aggregate))
    return 0


PREDICT_HELP = """\
Write one model's clean probabilities (the map that rank thresholds at 0.5) for some images,
normalised as the model's model.json says.

Every image goes through the network whole, or in 256x256 tiles with a 32 px halo when a side is
1024 px or more. A side that is not a multiple of 32 (or of the network's own size step, if
larger) is mirror-padded up to one and cropped back: in the last pixels at the bottom and right
the values can then differ from another framework that handles odd sizes its own way (on sizes
that are multiples, converted models match PyTorch to float precision).

example:
  cte-jax predict --model bank/fluo256 --input images/ --out probs.npy
"""


def cmd_predict(args) -> int:
    from cte_jax.predict import predict_to_file

    out, names = predict_to_file(args.model, args.input, args.out, batch_size=args.batch_size, dataset=args.dataset,
                                 progress=not args.quiet)
    if out.suffix.lower() == ".npz":
        print(f"wrote {out}: one (c h w) array per image, keyed by image name ({len(names)} images)")
    else:
        shown = ", ".join(names[:8]) + (f", ... ({len(names)} in all)" if len(names) > 8 else "")
        print(f"wrote {out}: (n c h w), one row per image in this order: {shown}")
    return 0


def _add_common(p: argparse.ArgumentParser):
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cte-jax", description="Consistency-based transferability estimation: rank pre-trained "
        "segmentation models for unlabelled microscopy data, in JAX.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run `cte-jax COMMAND --help` for each command. Start with `cte-jax rank` (no arguments: the demo).")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("rank", help="rank a model bank on an unlabelled target", description=RANK_HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bank", help="bank directory (one subfolder per model) or one model directory "
                   "(default: the demo bank)")
    p.add_argument("--target", help="folder of PNG/TIFF/JPEG images, one image or TIFF stack, or a zarr/N5 array "
                   "(default: the demo target)")
    p.add_argument("--dataset", help="array path inside a zarr/N5 container")
    p.add_argument("--perturbation", nargs="+", default=["dropout:0.1"], metavar="SPEC", help=PERT_HELP)
    p.add_argument("--metric", nargs="+", default=["nhd"], choices=["nhd", "ei", "vrand", "confidence", "entropy"],
                   help="consistency metric(s): nhd (hard, IoU of masks), ei (soft), vrand (instances); "
                   "or the baselines confidence and entropy, from the clean pass alone (default: nhd, the "
                   "paper's headline score; on our fluorescence nuclei study nhd and ei ranked about equally well, "
                   "see the README)")
    p.add_argument("--aggregate", default="median", choices=["median", "mean"],
                   help="how per-image scores make a model's score (default: median, as the paper)")
    p.add_argument("--seed", type=int, default=0, help="seed of every random draw (default: 0)")
    p.add_argument("--batch-size", type=int, default=8, help="image patches per compiled call (default: 8)")
    p.add_argument("--threshold", type=float, default=0.5, help="probability threshold of hard masks (default: 0.5)")
    p.add_argument("--tile-above", type=int, default=1024,
                   help="tile images with a side >= this into 256x256 patches (halo 32) (default: 1024)")
    p.add_argument("--strategy", default="auto", choices=["auto", "map", "vmap"],
                   help="how stacked same-architecture models run: map (loop; fastest on CPU), vmap "
                   "(accelerators); auto picks by backend")
    p.add_argument("--precision", default="float32", choices=["float32", "bfloat16"], help="compute precision")
    p.add_argument("--json", metavar="FILE", help="also write the result as JSON: {settings (bank, target, "
                   "perturbations, metrics, aggregate, seed, ...), records (one per model, perturbation and metric; "
                   "clean-pass baselines once per model, perturbation null)}")
    p.add_argument("--csv", metavar="FILE", help="also write the records as CSV")
    g = p.add_argument_group("scale: devices, hosts, long runs")
    g.add_argument("--results", metavar="FILE", help="append every per-image score to this .jsonl as it is "
                   "computed (default with --json/--csv: OUT.scores.jsonl beside it)")
    g.add_argument("--resume", action="store_true", help="continue an interrupted run from its results file: "
                   "scored images are not read again and finished (model, perturbation) pairs never rerun "
                   "(adding a metric reruns every pair: scores are stored per pair with all their metrics)")
    g.add_argument("--overwrite", action="store_true", help="start the results file afresh although it holds an "
                   "earlier run's scores (without --resume or --overwrite such a file is refused, not lost)")
    g.add_argument("--devices", type=int, metavar="N", help="use the first N local devices (default: all)")
    g.add_argument("--shard", default="auto", choices=["auto", "none", "models", "images"],
                   help="split the bank (models) or each batch of images (images) over the devices; auto: "
                   "whichever leaves fewer devices idle, and says which it chose (default: auto); scores "
                   "do not depend on it")
    g.add_argument("--distributed", action="store_true", help="one of several processes (hosts): SLURM and "
                   "Open MPI launches are detected, otherwise give the three options below; process 0 "
                   "prints and writes the result")
    g.add_argument("--coordinator", metavar="HOST:PORT", help="address of process 0 (with --distributed)")
    g.add_argument("--num-processes", type=int, metavar="N", help="number of processes (with --distributed)")
    g.add_argument("--process-id", type=int, metavar="I", help="this process, 0..N-1 (with --distributed)")
    g.add_argument("--timeout", type=int, default=300, metavar="S",
                   help="seconds to wait for the other processes to join (default: 300)")
    _add_common(p)
    p.set_defaults(func=cmd_rank)

    p = sub.add_parser("predict", help="write a model's clean probability maps for some images",
                       description=PREDICT_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="model directory")
    p.add_argument("--input", required=True,
                   help="image (PNG/TIFF/JPEG), folder of images, TIFF stack, or zarr/N5 array (as rank's --target)")
    p.add_argument("--dataset", help="array path inside a zarr/N5 container")
    p.add_argument("--out", required=True, help="output .npy or .tif: probabilities (n c h w), rows in the order of "
                   "the image names (sorted file names); .npz: one array per image name, for mixed sizes")
    p.add_argument("--batch-size", type=int, default=4, help="images or tiles per forward pass (default: 4)")
    _add_common(p)
    p.set_defaults(func=cmd_predict)

    for register in _EXTRA_COMMANDS:
        register(sub)
    return parser


_EXTRA_COMMANDS: list[Callable] = []

CONVERT_HELP = """\
Convert PyTorch, bioimage.io or ONNX U-Net weights into a cte_jax model directory, numerically
exact (checked against PyTorch and against published test outputs; a bioimage.io package whose
test output is not reproduced is refused). A network that ends without a sigmoid is taken to
output logits; ranking and prediction apply the sigmoid. torch is not needed.

examples:
  cte-jax convert best_checkpoint.pytorch --format pytorch-3dunet \\
      --arch '{"f_maps": 32, "layer_order": "gcr", "num_levels": 4, "final_sigmoid": true}' --out bank/plantseg
  cte-jax convert model.zip --format bioimageio --bank bank/
  cte-jax convert weights.pt --format torch-em --arch arch.yaml --normalize percentile:1,99.8 --out bank/em
  cte-jax convert model.onnx --format onnx --black-box --normalize zscore --out bank/onnx_model
"""


def cmd_convert(args) -> int:
    import converters

    out = converters.convert(args.source, format=args.format, arch=args.arch, normalize=args.normalize,
                             out=args.out, bank=args.bank, overwrite=args.overwrite, black_box=args.black_box,
                             task=args.task, channel=args.channel, weights=args.weights)
    print(f"wrote model directory {out}")
    for line in _conversion_facts(json.loads((out / "model.json").read_text())):
        print(textwrap.fill(line, 100, initial_indent="  ", subsequent_indent="    "))
    return 0


# The share of a package's test input its converted model may call foreground without a warning.
SANE_TEST_FOREGROUND = (0.001, 0.9)


def _conversion_facts(desc: dict) -> list[str]:
    """What a user should know about a converted model: its kind, its outputs, how it was checked."""
    prov = desc.get("provenance") or {}
    lines = []
    if "onnx" in desc:
        lines.append(f"black box, run by onnxruntime ({prov.get('black_box_reason', 'black box')}): it is scored "
                     f"with input perturbations only (e.g. --perturbation noise:0.01-0.03), not bottleneck dropout")
        if desc.get("postprocessing") == "sigmoid" and prov.get("graph_final_activation") is None:
            lines.append("its graph ends without a sigmoid: a sigmoid is applied to its outputs (taken as logits)")
    elif (desc.get("architecture") or {}).get("final_activation") is None:
        lines.append("the network ends without an activation: its outputs are taken as logits, and ranking and "
                     "prediction apply a sigmoid")
    if "test_output_max_abs_diff" in prov:
        diff = prov["test_output_max_abs_diff"]
        lines.append(f"reproduces the package's test output (max abs difference {diff:.2g})")
    elif "test_output_check" in prov:
        lines.append(f"test output not compared: {prov['test_output_check'].removeprefix('skipped: ')}")
    fg = prov.get("test_output_foreground_fraction")
    if fg is not None and not SANE_TEST_FOREGROUND[0] <= fg <= SANE_TEST_FOREGROUND[1]:
        lines.append(f"warning: on the package's own test input, {fg:.1%} of the pixels of the scored channel "
                     f"({desc.get('channel', 0)}) come out foreground. If that channel is not a foreground map "
                     f"(or its values are not logits or probabilities), rankings with this model mean little: "
                     f"check --channel and --task")
    arch = desc.get("architecture") or {}
    io_ = desc.get("onnx_io") or {}
    softmax = arch.get("final_activation") == "softmax" or prov.get("graph_final_activation") == "softmax" \
        or desc.get("postprocessing") == "softmax"
    n_out = arch.get("out_channels") if "architecture" in desc else io_.get("out_channels")
    if softmax and (n_out or 0) >= 2 and desc.get("channel", 0) == 0:
        lines.append(f"its softmax spreads each pixel over {n_out} channels, and channel 0 is scored: if channel 0 "
                     f"is the background (as in most two-class heads), convert again with --channel 1")
    if prov.get("verified_max_abs_diff") is not None:
        lines.append(f"matches onnxruntime on a random input (max abs difference {prov['verified_max_abs_diff']:.2g})")
    return lines


def _register_convert(sub):
    p = sub.add_parser("convert", help="import PyTorch / bioimage.io / ONNX U-Net weights as a model directory",
                       description=CONVERT_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="checkpoint (.pt/.pth/.pytorch), bioimage.io package (folder or .zip) or .onnx file")
    p.add_argument("--format", required=True, choices=["pytorch-3dunet", "torch-em", "bioimageio", "onnx"],
                   help="what SOURCE is")
    p.add_argument("--arch", help="architecture keyword arguments of the source library (pytorch-3dunet UNet2D "
                   "or torch-em UNet2d), inline JSON/YAML or a .json/.yaml file; unknown keys are an error")
    p.add_argument("--normalize", metavar="SPEC", help="input normalisation: percentile:LOW,HIGH | zscore | "
                   "minmax:A,B | none (default: the package's preprocessing, else zscore)")
    p.add_argument("--out", help="model directory to write (its name is the model's name)")
    p.add_argument("--bank", help="add the model to this bank directory")
    p.add_argument("--overwrite", action="store_true", help="replace an existing model directory")
    p.add_argument("--black-box", action="store_true", help="keep ONNX weights as a black-box model (onnxruntime)")
    p.add_argument("--weights", help="bioimage.io weight format to import (pytorch_state_dict, torchscript, "
                   "onnx; default: the first one the package has that cte_jax reads)")
    p.add_argument("--task", default="foreground", choices=["foreground", "boundary"],
                   help="what the scored output channel is (default: foreground)")
    p.add_argument("--channel", type=int, default=0, help="output channel to score (default: 0)")
    p.set_defaults(func=cmd_convert)


_EXTRA_COMMANDS.append(_register_convert)

TRAIN_HELP = """\
Train a small U-Net (BCE + Dice loss, flips/rot90 and intensity augmentations, bottleneck
dropout) on one or more labelled domains and write a model directory a bank can hold.

A domain is a folder with images/, labels/ (instance or binary labels, same stems) and split.json
({"train": [...], "test": [...]}); validation images are a fixed subset of the train split.

example:
  cte-jax train --data ../shared/data/nuclei/dsb2018_fluo_256 --features 16,32,64 --steps 2000 --out bank/fluo256
"""


def cmd_train(args) -> int:
    import shlex

    from cte_jax import train

    try:
        config = train.config_from_args(args, command=shlex.join(["cte-jax", "train", *sys.argv[2:]]))
    except ValueError as e:
        raise CTEError(str(e)) from None
    out = train.train(config, args.out, progress=not args.no_progress, overwrite=args.overwrite)
    print(f"wrote model directory {out}")
    return 0


def _register_train(sub):
    from cte_jax import train

    p = sub.add_parser("train", help="train a U-Net on labelled domains and write a model directory",
                       description=TRAIN_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    train.add_arguments(p)
    p.set_defaults(func=cmd_train)


_EXTRA_COMMANDS.append(_register_train)

EVALUATE_HELP = """\
Judge CTE against ground truth: on labelled targets, compute every model's CTE scores, the
baselines (mean foreground confidence, 1 - mean entropy, MC-dropout variance agreement, CCFV) and
its true performance (foreground F1 or instance mAP, median over images), then Kendall tau,
Spearman rho and Pearson r of each estimator against performance, with permutation p-values.

Models predicting far less foreground than the bank's typical model (LOW: below a fifth of the
median over the models that predict at most half of the image), or far more (HIGH: above
max(0.5, twice that median); every model above half the image when none predicts less), are
flagged: their consistency may be high for the wrong reason. Each estimator is reported
unchanged (paper), without the flagged models (unflagged), and with a corrected score
(--correction).

A target is a labelled domain folder (images/, labels/, split.json), e.g. ../shared/data/nuclei/
dsb2018_fluo_256; with several targets the statistics are also averaged over targets.

examples:
  cte-jax evaluate --bank bank/ --target data/nuclei/dsb2018_fluo_256 --out eval/
  cte-jax evaluate --bank bank/ --target images/ --labels labels/ --performance map --out eval/
  cte-jax evaluate --bank bank/ --target dom_a dom_b --exclude-for dom_a=model1,model2 \\
      --perturbation dropout:0.05 dropout:0.1 dropout:0.2 dropout:0.3 dropout:0.4 dropout:0.5 --out eval/
"""


def _parse_exclude_for(items: Sequence[str] | None) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for item in items or []:
        target, sep, names = item.partition("=")
        if not sep or not target or not names:
            raise CTEError(f"--exclude-for takes TARGET=MODEL[,MODEL...], got {item!r}")
        out.setdefault(target, []).extend(n for n in names.split(",") if n)
    return out


def _evaluation_table(estimators: dict, multi: bool) -> str:
    def f(v):
        return "-" if v is None else f"{v:+.3f}"

    lines = []
    width = max([len(k) for k in estimators] + [9])
    if multi:
        lines.append(f"{'estimator':<{width}}  {'variant':<9}  {'K_tau':>15}  {'S_rho':>15}  {'P_r':>15}   "
                     f"(mean(std) over targets)")
    else:
        lines.append(f"{'estimator':<{width}}  {'variant':<9}  {'n':>3}  {'K_tau (p)':>15}  {'S_rho (p)':>15}  "
                     f"{'P_r (p)':>15}")
    for key, variants in estimators.items():
        for v, st in variants.items():
            if st is None:
                continue
            cells = []
            for s in ("kendall_tau", "spearman_rho", "pearson_r"):
                if multi:
                    cells.append(f"{f(st['mean'][s])}({f(st['std'][s])})")
                else:
                    pv = st.get(f"{s}_pvalue")
                    cells.append(f"{f(st.get(s))} ({'-' if pv is None else f'{pv:.3f}'})")
            n = "" if multi else f"{st['n_models']:>3}  "
            lines.append(f"{key:<{width}}  {v:<9}  {n}" + "  ".join(f"{c:>15}" for c in cells))
    if not multi:
        lines.append("n: models in the statistic; p: permutation p-value (two-sided)")
    return "\n".join(lines)


def _evaluation_models(res: dict) -> str:
    """One target's models, best true performance first, with every estimator's score."""
    keys = list(res["estimators"])
    width = max([len(m["model"]) for m in res["models"]] + [5])
    cols = [max(len(k), 7) for k in keys]
    lines = [f"{'model':<{width}}  {'perf':>6}  " + "  ".join(f"{k:>{c}}" for k, c in zip(keys, cols)) + "  flag"]
    rows = sorted(res["models"], key=lambda m: float("inf") if m["performance"] is None else -m["performance"])
    for m in rows:
        perf = "-" if m["performance"] is None else f"{m['performance']:.3f}"
        vals = [m["scores"].get(k) for k in keys]
        cells = ["-" if v is None else f"{v:.4f}" if abs(v) < 10 else f"{v:.1f}" for v in vals]
        flag = "LOW" if m.get("low_foreground") else "HIGH" if m.get("high_foreground") else ""
        lines.append(f"{m['model']:<{width}}  {perf:>6}  " + "  ".join(f"{c:>{w}}" for c, w in zip(cells, cols))
                     + f"  {flag}".rstrip())
    return "\n".join(lines)


def _print_target(res: dict):
    """One target's evaluation: its models with performance and scores, then the statistics."""
    from cte_jax import evaluate as ev

    table = {k: {v: e.get(v) for v in ev.VARIANTS} for k, e in res["estimators"].items()}
    split = f" (split {res['split']})" if res.get("split") else ""
    print(f"target {res['target']}: {res['n_images']} images{split}, {len(res['models'])} models, "
          f"performance = {res['performance_label']}")
    if res["flagged"]:
        print(f"flagged models (foreground far below or above the bank median): {', '.join(res['flagged'])}")
    print(_evaluation_models(res))
    print()
    print(_evaluation_table(table, multi=False))
    for line in _few_images_note(res["n_images"]):
        print(line)


def cmd_evaluate(args) -> int:
    from cte_jax import evaluate as ev

    _check_perturbations(args.perturbation)
    baselines = [] if args.baselines in (["none"], []) else args.baselines
    if "none" in baselines:
        raise CTEError("--baselines none cannot be combined with other baselines")
    correction = None if args.correction == "none" else args.correction
    opts = dict(perturbations=args.perturbation, metrics=args.metric, task=args.task, performance=args.performance,
                min_size=args.min_size, baselines=baselines, correction=correction, aggregate=args.aggregate,
                out_dir=args.out, seed=args.seed, batch_size=args.batch_size, threshold=args.threshold,
                tile_above=args.tile_above, n_permutations=args.permutations, plots=not args.no_plots,
                progress=not args.quiet)
    per_target = _parse_exclude_for(args.exclude_for)
    names = [Path(t).name for t in args.target]
    unknown = sorted(set(per_target) - set(names))
    if unknown:
        raise CTEError(f"--exclude-for names unknown targets {unknown}; targets are {names}")
    if len(args.target) == 1:
        res = ev.evaluate(args.bank, args.target[0], labels=args.labels, split=args.split, name=names[0],
                          exclude=list(args.exclude or []) + per_target.get(names[0], []), **opts)
        _print_target(res)
    else:
        if args.labels:
            raise CTEError("--labels works with one --target; give labelled domain folders for several")
        targets = [ev.LabelledTarget(name=n, path=t, split=args.split,
                                     exclude=tuple(args.exclude or []) + tuple(per_target.get(n, [])))
                   for n, t in zip(names, args.target)]
        res = ev.evaluate_targets(args.bank, targets, **opts)
        for one in res["targets"].values():
            _print_target(one)
            print()
        print(f"mean (std) over the {len(targets)} targets: {', '.join(names)}")
        print(_evaluation_table(res["summary"], multi=True))
    if args.out:
        print(f"wrote {args.out}")
    return 0


def _register_evaluate(sub):
    from cte_jax.evaluate import BASELINES, CORRECTIONS

    p = sub.add_parser("evaluate", help="correlate CTE and baselines with true performance on labelled targets",
                       description=EVALUATE_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bank", required=True, help="bank directory (one subfolder per model)")
    p.add_argument("--target", required=True, nargs="+", metavar="DIR",
                   help="labelled domain folder(s) (images/, labels/, split.json); or an image folder with --labels")
    p.add_argument("--labels", help="folder of label images named as the images (single target)")
    p.add_argument("--split", default="auto",
                   help="split.json key to evaluate on, or 'all' (default: auto = the test split when the target "
                   "has a split.json, else every image). When no model of the bank was trained on the target "
                   "domain, 'all' is safe and gives a steadier ranking: on our nuclei study a 4-image test split "
                   "ranked wrong-signed")
    p.add_argument("--perturbation", nargs="+", default=["dropout:0.1"], metavar="SPEC", help=PERT_HELP)
    p.add_argument("--metric", nargs="+", default=["nhd"], choices=["nhd", "ei", "vrand"],
                   help="CTE metric(s) (default: nhd)")
    p.add_argument("--baselines", nargs="*", default=list(BASELINES), choices=list(BASELINES) + ["none"],
                   help=f"baselines to compare with (default: all of {', '.join(BASELINES)}); 'none' for none")
    p.add_argument("--performance", default="f1", choices=["f1", "map"],
                   help="true performance: f1 (foreground F1, semantic) or map (instance mAP@0.5:0.95) (default: f1)")
    p.add_argument("--task", choices=["foreground", "boundary"], help="check that the models have this task")
    p.add_argument("--min-size", type=int, default=50, help="drop predicted objects below this size for mAP (default: 50)")
    p.add_argument("--correction", default="flag_last", choices=list(CORRECTIONS) + ["none"],
                   help="corrected-score variant beside the paper's: flag_last (flagged models ranked last; "
                   "nothing changes when none is flagged), fg_ratio (score x min(1, fg / bank median fg): "
                   "on our nuclei study it lowered CTE-NHD's mean S_rho from 0.77 to 0.52), none "
                   "(default: flag_last)")
    p.add_argument("--exclude", nargs="+", metavar="MODEL", help="models to leave out on every target")
    p.add_argument("--exclude-for", action="append", metavar="TARGET=MODEL[,MODEL...]",
                   help="models to leave out on one target (its folder name), e.g. those trained on it; repeatable")
    p.add_argument("--aggregate", default="median", choices=["median", "mean"],
                   help="per-image aggregate of scores and performance (default: median)")
    p.add_argument("--seed", type=int, default=0, help="seed of perturbations, CCFV sampling, permutation tests")
    p.add_argument("--batch-size", type=int, default=8, help="image patches per compiled call (default: 8)")
    p.add_argument("--threshold", type=float, default=0.5, help="probability threshold (default: 0.5)")
    p.add_argument("--tile-above", type=int, default=1024, help="tile images with a side >= this (default: 1024)")
    p.add_argument("--permutations", type=int, default=10000, help="permutation-test size (default: 10000)")
    p.add_argument("--out", metavar="DIR", help="write CSV/JSON tables and PNG figures here")
    p.add_argument("--no-plots", action="store_true", help="do not draw figures")
    _add_common(p)
    p.set_defaults(func=cmd_evaluate)


_EXTRA_COMMANDS.append(_register_evaluate)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    __import__("cte_jax.cache").cache.enable_compilation_cache()  # on unless CTE_JAX_CACHE_DIR=off
    try:
        return args.func(args) or 0
    except CTEError as e:
        print(f"cte-jax {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        saved = args.command == "rank" and (args.results or args.json or args.csv)
        hint = "; run it again with --resume to continue from the scores saved so far" if saved else ""
        print(f"cte-jax {args.command}: interrupted{hint}", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # the reader of stdout went away (`| head`): nothing more to print, and no traceback on exit
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
