"""The argparse tree of ``basin-volume``: option groups shared by the commands."""

from __future__ import annotations

import argparse
import dataclasses

from ..config import VolumeConfig
from ._types import (
    CACHE_MODES,
    DTYPES,
    MEASURES,
    MODEL_TYPES,
    PRECONDITIONERS,
    _eps,
    _parameters,
    _Parser,
    _positive_float,
    _positive_int,
    _rtol,
    _seed,
)
from .assemble import _ESTIMATION_DEFAULTS as _DEFAULTS
from .commands import _compare, _demo, _estimate, _plot, _scan


# ---------------------------------------------------------------------------- the parser
class _Formatter(argparse.HelpFormatter):
    """Wraps descriptions and help; keeps the epilog (examples) as written."""

    def add_text(self, text):
        if text and text.startswith(("output:", "examples:")):
            self._add_item(lambda t: t + "\n", [text])
        else:
            super().add_text(text)


_FORMATTER = _Formatter


_CONFIG_DEFAULTS = {f.name: f.default for f in dataclasses.fields(VolumeConfig)}
"""The defaults the help texts quote: :class:`~basin_volume.VolumeConfig`'s."""

def _add_model_options(p: argparse.ArgumentParser, *, scan: bool = False) -> None:
    g = p.add_argument_group("model")
    g.add_argument(
        "-m",
        "--model",
        required=not scan,
        help="the trained network: a local Hugging Face model folder (written by "
        "save_pretrained), a hub name such as EleutherAI/pythia-14m, 'digits' for the bundled "
        "digits MLP (trained here in seconds), or module:function (also path/file.py:function) "
        "returning (model, inputs) for a classifier, (model, tokenizer, dataset) for a "
        "language model, (fn, center) for any objective, or a VolumeConfig"
        + ("; with --checkpoints leave it out" if scan else ""),
    )
    g.add_argument(
        "--model-type",
        choices=MODEL_TYPES,
        default="auto",
        metavar="{" + ",".join(MODEL_TYPES) + "}",
        help="how to read --model (default auto: inferred). causal: a Hugging Face causal LM, "
        "basin = mean per-token KL of next-token distributions over the --data texts; "
        "classifier: a module mapping inputs to logits, basin = mean KL of its predictions; "
        "mlp: the bundled digits MLP; pythia: --model is a Pythia size (14m, 70m, ...) loaded "
        "from EleutherAI/pythia-SIZE at --revision; convnext: an image classifier, --model "
        "module:function returning (model, pixel_values)",
    )
    g.add_argument(
        "--revision",
        help="hub revision of the model: branch, tag or commit (Pythia training checkpoints "
        "are step0 ... step143000)",
    )
    g.add_argument(
        "--dtype",
        choices=DTYPES,
        default="auto",
        help="cast the parameters before the run (default auto: as stored); the basin is "
        "measured in this precision",
    )
    g.add_argument(
        "--digits-steps",
        type=_positive_int,
        default=1000,
        help="Adam steps when training the digits MLP (default 1000)",
    )
    g.add_argument(
        "--digits-seed",
        type=int,
        default=0,
        help="seed of the digits MLP's train/test split and initialisation (default 0)",
    )


def _add_data_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "data (language models: the texts whose next-token predictions define the basin)"
    )
    g.add_argument(
        "-d",
        "--data",
        help="validation texts: a local .txt (one text per line), .json (list of records or "
        "{field: [texts]}), .jsonl (one record per line) or .csv file, a folder written by "
        "Dataset.save_to_disk, or a hub data set name such as NeelNanda/pile-10k",
    )
    g.add_argument("--split", default="train", help="split of a hub data set (default train)")
    g.add_argument("--data-config", help="configuration (subset) of a hub data set")
    g.add_argument(
        "--text-field",
        default="text",
        help="field of each record that holds the text (default text)",
    )
    g.add_argument(
        "--val-size",
        type=_positive_int,
        help="texts (sequences) the KL is averaged over; only these are tokenised "
        f"(default: VolumeConfig's, {_CONFIG_DEFAULTS['val_size']})",
    )
    g.add_argument(
        "--max-seq-len",
        type=_positive_int,
        help="tokens per sequence; longer texts are cut (default: VolumeConfig's, "
        f"{_CONFIG_DEFAULTS['max_seq_len']})",
    )
    g.add_argument(
        "--chunking",
        action="store_true",
        help="join the texts with end-of-text tokens and cut chunks of --max-seq-len tokens",
    )
    g.add_argument(
        "--cache-mode",
        choices=CACHE_MODES,
        help="where the centre's next-token log-probabilities are kept: on the model's "
        "device (gpu), in CPU memory (cpu), recomputed at every evaluation (none), or "
        "auto (the device if it fits); all give the same estimates",
    )
    g.add_argument(
        "--data-batch-size",
        type=_positive_int,
        help="examples per forward pass (lower it if memory runs out)",
    )
    g.add_argument(
        "--compile",
        action="store_true",
        help="evaluate the model through torch.compile (costs time up front; pays off for "
        "large models on GPUs; estimates agree with eager ones to float precision)",
    )


def _add_estimation_options(p: argparse.ArgumentParser, *, scan: bool = False) -> None:
    g = p.add_argument_group("estimation")
    g.add_argument(
        "-n",
        "--n-samples",
        type=_positive_int,
        help="random directions; more give a steadier estimate and a higher ESS "
        f"(default {_DEFAULTS['n_samples']})",
    )
    if not scan:
        g.add_argument(
            "--cutoff",
            type=_positive_float,
            help="epsilon: the basin is where the KL divergence (or objective increase) from "
            f"the trained network stays at most this many nats (default {_DEFAULTS['cutoff']:g})",
        )
    g.add_argument(
        "--measure",
        choices=MEASURES,
        help="gaussian (default): log probability that an initialisation drawn from "
        "N(0, sigma^2 I) lands in the basin; uniform: log Lebesgue volume of the basin",
    )
    g.add_argument(
        "--sigma",
        type=_positive_float,
        help="prior scale for --measure gaussian (default: RMS of the trained parameters, "
        "||theta0||/sqrt(D))",
    )
    g.add_argument(
        "--rtol",
        type=_rtol,
        help="each radius is found to |KL(r) - cutoff| <= rtol * cutoff; at most 0.5 "
        f"(default {_DEFAULTS['rtol']:g})",
    )
    g.add_argument(
        "--seed",
        type=_seed,
        help="seed of the random directions, 0 to 2^63-1; direction k depends only on it and "
        "k (default 0)",
    )
    g.add_argument(
        "--method",
        choices=("auto", "smc", "is"),
        help="auto (default): smc, except with --resume, in the memory-light mode of large "
        "models, with an adaptive or dense "
        "preconditioner or several torchrun processes, where it is is; smc: sequential Monte "
        "Carlo (docs/accuracy.md), saved when it ends (no run log, no --resume); is: "
        "importance sampling of directions, written to a run log as they finish and "
        "resumable, a lower bound unless its ESS is high",
    )
    g.add_argument(
        "--budget",
        type=_positive_int,
        help="cap on the evaluations of the objective (default: none). smc: a pilot run "
        "prices a particle and the replicas get as many as fit, at most -n; auto: importance "
        "sampling where not even 16 fit; is: the directions stop once it is spent",
    )
    g.add_argument(
        "--bidirectional",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="smc: walk each replica's particles back along tempering's levels too, a check "
        "that its moves mixed that about doubles tempering's cost (default: on without "
        "--budget, off under one)",
    )
    g.add_argument(
        "--parameters",
        type=_parameters,
        help="which parameters are the basin's coordinates: trainable (default: those with "
        "requires_grad), all, or comma-separated names and glob patterns, e.g. "
        "'gpt_neox.layers.*.mlp.*' (the prior, the preconditioner and D follow)",
    )
    pg = p.add_argument_group("preconditioner (importance sampling of directions)")
    pg.add_argument(
        "--preconditioner",
        choices=PRECONDITIONERS,
        default="none",
        help="draw directions longer along flat parameters and reweight them exactly: none "
        "(isotropic, default), adam (scales 1/(v^exponent + eps) from the optimizer's "
        "second moments), fisher (from the diagonal Fisher of the KL basin on the data; no "
        "optimizer state needed), fisher_dense (the full Fisher's eigenbasis; classifiers "
        "of at most 20,000 parameters), adaptive (refined over rounds from the radii seen; "
        "--n-samples must be a multiple of 4)",
    )
    pg.add_argument(
        "--preconditioner-eps",
        type=_eps,
        default=None,
        help="eps in 1/(v^exponent + eps): a number, or 'prior' to bound each direction's "
        "reach by the prior's scale (default: 1e-5 for adam, 'prior' for fisher)",
    )
    pg.add_argument(
        "--preconditioner-exponent",
        type=_positive_float,
        default=0.5,
        help="exponent in 1/(v^exponent + eps) (default 0.5)",
    )
    pg.add_argument(
        "--adam-order",
        type=int,
        choices=(1, 2),
        default=2,
        help="Adam moment used: 2 = exp_avg_sq (default), 1 = |exp_avg|",
    )
    pg.add_argument(
        "--optimizer-state",
        help="optimizer state_dict saved with torch.save (e.g. a Trainer checkpoint's "
        "optimizer.pt; default: optimizer.pt in the model folder, if there)",
    )


def _add_run_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("run")
    g.add_argument(
        "--device",
        default="auto",
        help="where the model runs: auto (default: cuda, else mps, else cpu), cpu, cuda, "
        "cuda:N or mps",
    )
    g.add_argument(
        "--resume",
        action="store_true",
        help="continue the run saved at the output (same options; --n-samples may be raised); "
        "the result equals an uninterrupted run's, direction for direction",
    )
    g.add_argument(
        "--overwrite", action="store_true", help="replace existing results at the output"
    )
    g.add_argument("-q", "--quiet", action="store_true", help="no progress bar or status lines")


_EPILOG_ESTIMATE = """\
output:
  OUTPUT (JSON) holds the result: every per-direction array, log_volume with its 95%
  bootstrap interval and ESS, the configuration, versions, device and timings; read it with
  basin_volume.VolumeResult.load. While running, each finished direction is appended to
  OUTPUT's run log (results.json -> results.records.jsonl), so an interrupted run loses at
  most the direction in progress: rerun the same command with --resume.

examples:
  basin-volume estimate --model digits --n-samples 200 -o digits.json
  basin-volume estimate --model ./my-lm --data val.jsonl --text-field text \\
      --val-size 20 --max-seq-len 256 --cutoff 0.01 -o lm.json
  basin-volume estimate --model-type pythia --model 14m --revision step1000 \\
      --data NeelNanda/pile-10k --split train -o pythia14m-step1000.json
  basin-volume estimate ... -o lm.json --resume          # after an interruption
"""

_EPILOG_SCAN = """\
examples:
  basin-volume scan --model digits --cutoffs 0.001 0.01 0.1 1 -o scan-digits
  basin-volume scan --checkpoints run/checkpoint-500 run/checkpoint-1000 \\
      --data val.jsonl -o scan-ckpt
  basin-volume scan --model-type pythia --model 14m --steps 1000 8000 64000 \\
      --data NeelNanda/pile-10k -o scan-pythia
Each point is written to DIR/<name>.json (resumable like estimate); DIR/scan.json holds
the summary table and DIR/scan.png plots log probability (nats) against step or cutoff.
"""


def _model_command(sub, name: str, help: str, description: str, epilog: str, *, scan=False):
    """A sub-command that runs estimates of a model: its parser, with the model options."""
    parser = sub.add_parser(
        name, help=help, description=description, epilog=epilog, formatter_class=_FORMATTER
    )
    _add_model_options(parser, scan=scan)
    return parser


def build_parser() -> argparse.ArgumentParser:
    """The ``basin-volume`` argument parser with all sub-commands."""
    parser = _Parser(
        prog="basin-volume",
        description="Tyche: estimate how much of parameter space behaves like a trained "
        "network (log probability of its basin under the initialisation prior, in nats).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = sub.add_parser(
        "demo",
        help="train the bundled digits MLP and estimate its basin",
        description="Train the digits MLP on scikit-learn's bundled digits and estimate the "
        "log probability that a random initialisation N(0, sigma^2 I), sigma = RMS of the "
        "trained weights, lands in its KL basin.",
    )
    demo.add_argument(
        "--n-samples",
        type=_positive_int,
        default=_DEFAULTS["n_samples"],
        help=f"random directions (default {_DEFAULTS['n_samples']})",
    )
    demo.add_argument(
        "--cutoff",
        type=_positive_float,
        default=_DEFAULTS["cutoff"],
        help=f"KL cutoff in nats that defines the basin (default {_DEFAULTS['cutoff']:g})",
    )
    demo.add_argument(
        "--seed", type=_seed, default=_DEFAULTS["seed"], help="seed of training and directions"
    )
    demo.add_argument("--output", help="write the result as JSON to this path")
    demo.add_argument("--quiet", action="store_true", help="no progress bar")
    demo.set_defaults(handler=_demo)

    est = _model_command(
        sub,
        "estimate",
        "estimate one model's basin, saving each direction as it finishes",
        "Estimate the log probability (in nats) that a random initialisation lands in the "
        "trained model's basin: the parameters whose outputs stay within --cutoff nats of KL "
        "divergence of the trained model's.",
        _EPILOG_ESTIMATE,
    )
    _add_data_options(est)
    _add_estimation_options(est)
    _add_run_options(est)
    est.add_argument(
        "-o", "--output", required=True, help="results file to write (JSON), e.g. results.json"
    )
    est.set_defaults(handler=_estimate)

    plot = sub.add_parser(
        "plot",
        help="plot results files (estimates, convergence, radii) or a scan summary",
        description="Plot one or more results files side by side: the histogram of "
        "per-direction log estimates with the aggregate marked, the running log-mean-exp "
        "against the number of directions with its 95% bootstrap band, and the radii. "
        "Run logs (.records.jsonl) of unfinished runs work too. Given a scan.json, plot log "
        "probability against step or cutoff. All log quantities are in nats.",
    )
    plot.add_argument("files", nargs="+", metavar="RESULTS", help="results files (.json)")
    plot.add_argument(
        "-o", "--output", help="image to write: .png, .pdf or .svg (default: RESULTS.png)"
    )
    plot.add_argument("--labels", nargs="+", help="legend names, one per file")
    plot.add_argument("--title", help="figure title")
    plot.set_defaults(handler=_plot)

    cmp_ = sub.add_parser(
        "compare",
        help="table of log_volume, interval, ESS, n and differences in nats and log10",
        description="Compare results files: log_volume with its 95% bootstrap interval, "
        "ESS, number of directions, and the difference from the reference in nats and in "
        "log10. Estimates with ESS below 5 are flagged: they are likely lower bounds.",
    )
    cmp_.add_argument("files", nargs="+", metavar="RESULTS", help="results files (.json)")
    cmp_.add_argument("--labels", nargs="+", help="row names, one per file")
    cmp_.add_argument(
        "--reference",
        type=int,
        default=0,
        help="index of the file the differences are taken from (default 0, the first)",
    )
    cmp_.add_argument("--json", action="store_true", help="print the table as JSON")
    cmp_.set_defaults(handler=_compare)

    scan = _model_command(
        sub,
        "scan",
        "the same estimate over checkpoints or cutoffs, with a summary plot",
        "Run the same estimate over a list of checkpoints (training steps) or cutoffs: one "
        "results file each, a summary table and a plot of log probability (nats) against step "
        "or cutoff.",
        _EPILOG_SCAN,
        scan=True,
    )
    what = scan.add_argument_group("what to scan (give one)")
    what.add_argument(
        "--cutoffs", nargs="+", type=_positive_float, help="cutoffs in nats, one run each"
    )
    what.add_argument(
        "--checkpoints",
        nargs="+",
        help="model folders (or any --model values), one run each; the step is read from "
        "names like checkpoint-500 or step1000 unless --steps is given",
    )
    what.add_argument(
        "--revisions", nargs="+", help="hub revisions of --model, e.g. step1000 step2000"
    )
    what.add_argument(
        "--steps",
        nargs="+",
        type=float,
        help="training step of each checkpoint or revision (the plot's x axis); with "
        "--model-type pythia and nothing else, the Pythia checkpoints to scan",
    )
    _add_data_options(scan)
    _add_estimation_options(scan, scan=True)
    scan.add_argument(
        "--cutoff",
        type=_positive_float,
        help=f"cutoff in nats when scanning checkpoints (default {_DEFAULTS['cutoff']:g})",
    )
    _add_run_options(scan)
    scan.add_argument(
        "-o", "--output-dir", required=True, help="folder for the results files and summary"
    )
    scan.set_defaults(handler=_scan)
    for p in (est, plot, cmp_, scan):
        for action in p._actions:
            if action.metavar is None and action.choices is None and action.nargs != 0:
                action.metavar = _METAVARS.get(action.dest)
    for p in (est, plot, cmp_, scan, demo):
        p.set_defaults(parser=p)
    return parser


_METAVARS = {
    "model": "MODEL",
    "revision": "REV",
    "digits_steps": "N",
    "digits_seed": "SEED",
    "data": "DATA",
    "split": "NAME",
    "data_config": "NAME",
    "text_field": "FIELD",
    "val_size": "N",
    "max_seq_len": "N",
    "data_batch_size": "N",
    "n_samples": "N",
    "cutoff": "NATS",
    "cutoffs": "NATS",
    "sigma": "SIGMA",
    "rtol": "RTOL",
    "seed": "SEED",
    "preconditioner_eps": "EPS",
    "preconditioner_exponent": "GAMMA",
    "optimizer_state": "PATH",
    "device": "DEVICE",
    "output": "PATH",
    "output_dir": "DIR",
    "checkpoints": "CKPT",
    "revisions": "REV",
    "steps": "STEP",
    "labels": "LABEL",
    "title": "TEXT",
    "reference": "INDEX",
}
