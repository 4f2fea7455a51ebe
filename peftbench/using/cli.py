"""``peftbench predict`` and ``peftbench export``: use a trained adapter from the command line."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

from peftbench.errors import ConfigError

FILE_KINDS = (".csv", ".jsonl")


def _add_selectors(p) -> None:
    p.add_argument("path", metavar="SUITE_DIR",
                   help="a suite folder (with --method), a trial folder, its adapter folder, or an exported folder")
    p.add_argument("--method", help="the trial's method (in a suite folder)")
    p.add_argument("--budget", help="the trial's budget, as the suite wrote it (needed when the suite has several)")
    p.add_argument("--seed", type=int, default=0, help="the trial's seed (default: 0)")
    p.add_argument("--task", help="the trial's task (needed when the suite has several)")
    p.add_argument("--backbone", help="the trial's backbone (needed when the suite has several)")
    p.add_argument("--variant", help="which config of the method, when the suite lists the method twice")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N, mps (default: cpu)")


def _load(args):
    from peftbench.contract.registry import get_registry
    from peftbench.using.load import load

    model = load(args.path, args.method, args.budget, args.seed, task=args.task, backbone=args.backbone,
                 variant=args.variant, device=args.device, registry=get_registry(plugins_dir=args.plugins_dir))
    for note in model.notes:
        print(f"note: {note}", file=sys.stderr)
    return model


# -- predict -----------------------------------------------------------------------------------
def read_rows(path: Path) -> list[dict]:
    """The rows of a .csv (header) or .jsonl (one object a line) file."""
    if path.suffix.lower() not in FILE_KINDS:
        raise ConfigError(f"--file {path}: allowed kinds are {', '.join(FILE_KINDS)}")
    if not path.is_file():
        raise ConfigError(f"--file {path} does not exist")
    if path.suffix.lower() == ".csv":
        with open(path, newline="") as f:
            return list(csv.DictReader(f))
    rows = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"--file {path} line {i} is not JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise ConfigError(f"--file {path} line {i} is not a JSON object")
            rows.append(row)
    return rows


def texts_of(rows: list[dict], columns: list[str], path: Path) -> list:
    """Each row's text (or pair of texts, for two columns)."""
    for column in columns:
        for i, row in enumerate(rows, 1):
            if column not in row:
                raise ConfigError(f"--file {path} row {i} has no column {column!r}; it has: {', '.join(row)} "
                                  f"(choose one with --text-column)")
    if len(columns) == 1:
        return [str(row[columns[0]]) for row in rows]
    return [(str(row[columns[0]]), str(row[columns[1]])) for row in rows]


def _results(model, texts: list, args) -> list[dict]:
    if model.kind == "generation":
        outs = model.generate(texts, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
        return [{"generated": g} for g in outs]
    out = []
    for pred in model.predict(texts, batch_size=args.batch_size):
        out.append({"label": pred.label, "score": pred.score, **{f"prob_{k}": v for k, v in pred.probs.items()}})
    return out


def _write(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".jsonl":
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
        return
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def _columns(args, model, rows: list[dict]) -> list[str]:
    """--text-column, else ``text``, else the task's own text column(s) when the file has them."""
    if args.text_column is not None:
        columns = [c.strip() for c in args.text_column.split(",") if c.strip()]
        if not 1 <= len(columns) <= 2:
            raise ConfigError(f"--text-column names one column, or two (comma-separated) for sentence pairs; got "
                              f"{args.text_column!r}")
        return columns
    own = list(model.meta.get("text_columns") or [])
    if own and not (len(own) == 1 and "text" in rows[0]) and all(c in rows[0] for c in own):
        return own
    return ["text"]


def cmd_predict(args) -> int:
    if args.out and Path(args.out).suffix.lower() not in FILE_KINDS:
        raise ConfigError(f"--out {args.out}: allowed kinds are {', '.join(FILE_KINDS)}")
    rows = read_rows(Path(args.file)) if args.file else []
    if not rows and not args.texts:
        raise ConfigError("nothing to predict: give texts, or --file in.csv|in.jsonl")
    model = _load(args)
    pairs = len(model.meta.get("text_columns") or ()) == 2
    columns = _columns(args, model, rows or [{}])
    if pairs and (args.texts or len(columns) != 2):
        raise ConfigError(f"{model.source} reads sentence pairs: give --file with --text-column FIRST,SECOND")
    if not pairs and len(columns) == 2:
        raise ConfigError(f"{model.source} reads one text per example: --text-column names one column")
    rows = [{columns[0]: t} for t in args.texts] + rows
    texts = texts_of(rows, columns, Path(args.file or "-"))
    results = [{**row, **res} for row, res in zip(rows, _results(model, texts, args))]
    if args.out:
        _write(Path(args.out), results)
        print(f"{len(results)} predictions -> {args.out}")
    elif args.json:
        print(json.dumps(results, indent=2))
    else:
        for text, res in zip(texts, results):
            shown = " | ".join(text) if isinstance(text, tuple) else text
            if model.kind == "generation":
                print(f"{res['generated']}\t{shown}")
            else:
                print(f"{res['label']}\t{res['score']:.4f}\t{shown}")
    return 0


# -- export ------------------------------------------------------------------------------------
def cmd_export(args) -> int:
    from peftbench.using.export import export

    model = _load(args)
    meta = export(model, args.out, args.format, tolerance=args.tolerance)
    if args.json:
        print(json.dumps(meta, indent=2))
    else:
        kernel = meta.get("max_abs_logit_diff_bnb_cpu_kernel")
        print(f"{meta.get('method')} ({args.format}) -> {args.out}: max |logit diff| against peftbench "
              f"{meta['max_abs_logit_diff']:.2e}" + ("" if kernel is None else
              f" ({kernel:.2e} where bitsandbytes uses its bfloat16 CPU kernel, as on this CPU by default)"))
    return 0


def _intermixed(parser) -> None:
    """Let TEXT... follow the options (``predict DIR --method M t1 t2``): plain argparse gives a '*'
    positional its (empty) share at the first positional, DIR, and then refuses t1 t2."""
    plain, busy = parser.parse_known_args, []

    def parse_known_args(args=None, namespace=None):
        if busy:  # parse_known_intermixed_args calls parse_known_args itself
            return plain(args, namespace)
        busy.append(True)
        try:
            return parser.parse_known_intermixed_args(args, namespace)
        finally:
            busy.pop()

    parser.parse_known_args = parse_known_args


def add_commands(sub) -> None:
    """Register ``predict`` and ``export`` on the ``peftbench`` command's subparsers."""
    from peftbench.using.load import EXPORT_CHOICES

    p = sub.add_parser("predict", help="label texts (or continue prompts) with a trained adapter")
    _add_selectors(p)
    p.add_argument("texts", nargs="*", metavar="TEXT", help="texts to label (or prompts, for a generative trial)")
    p.add_argument("--file", help="a .csv or .jsonl file of texts (column --text-column)")
    p.add_argument("--text-column",
                   help="the --file column holding the text; two comma-separated for sentence pairs (default: "
                        "text, else the task's own text column(s) when the file has them)")
    p.add_argument("--out", help="write predictions (the file's columns, label, score, prob_<label>) to a .csv or .jsonl")
    p.add_argument("--json", action="store_true", help="print the predictions as JSON")
    p.add_argument("--batch-size", type=int, default=32, help="texts per forward pass (default: 32)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="generative trials: tokens to generate (default: 64)")
    p.set_defaults(func=cmd_predict)
    _intermixed(p)

    p = sub.add_parser("export", help="export a trained adapter as a plain merged checkpoint or a peft adapter")
    _add_selectors(p)
    p.add_argument("--format", required=True, choices=EXPORT_CHOICES,
                   help="merged: a plain transformers folder (mergeable methods); peft: a peft adapter + its base "
                        "(methods with a peft equivalent; a 4-bit base is saved in 4 bits); safetensors: the "
                        "adapter alone (weights + head + metadata, no base), which peftbench.load puts on its base")
    p.add_argument("--out", required=True, metavar="DIR", help="a new (or empty) folder")
    p.add_argument("--tolerance", type=float, default=1e-4,
                   help="largest |logit difference| against peftbench accepted when checking the export (default: 1e-4)")
    p.add_argument("--json", action="store_true", help="print what peftbench.json records")
    p.set_defaults(func=cmd_export)
