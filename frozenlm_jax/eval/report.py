"""Evaluate runs on their tasks and write the report: `results.json`, `results.md` (a table per task like the
paper's: rows = runs and variants, columns = shots) and `accuracy_vs_shots.png`."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import textwrap
from collections.abc import Sequence

import ml_collections
import numpy as np

from frozenlm_jax import paths
from frozenlm_jax.config import default_config
from frozenlm_jax.eval.suite import Suite, check_settings
from frozenlm_jax.export import load_frozen

RESULTS_JSON, RESULTS_MD, PLOT_PNG = "results.json", "results.md", "accuracy_vs_shots.png"
LM_ONLY = "LM only (no images)"
TEXT_ORACLE = "text oracle (scene text for images)"
CHANCE = "chance"
LINE_STYLES = {"model": "-", "chance": ":"}  # other rows dashed
TRAINED_LM_VARIANTS = ("finetuned", "scratch")


def run_settings(path) -> ml_collections.ConfigDict:
    """The `eval` section of a run's saved `config.json`, defaults filling what it lacks (all of it for an
    exported model, which keeps no config)."""
    settings = default_config().eval
    saved = paths.path(path) / "config.json"
    if saved.exists():
        section = json.loads(saved.read_text()).get("eval", {})
        try:  # JSON's lists become the config's tuples
            settings.update(section)
        except (AttributeError, KeyError) as e:
            raise ValueError(f"{saved} has eval keys this version does not know ({e}); evaluate it with the version "
                             "of frozenlm_jax that trained it") from None
    return settings


def row_names(workdirs: Sequence) -> list[str]:
    """Each workdir's folder name, or its path as given where two names clash."""
    names = [_key(w).name for w in workdirs]
    return [str(w) if names.count(n) > 1 else n for n, w in zip(names, workdirs)]


def _key(path):
    """A run's path as one key: a local one resolved (symlinks, `..`), a gs:// one as given."""
    path = paths.path(path)
    return path if paths.is_remote(path) else paths.path(os.path.realpath(path))  # epath's resolve keeps links


def evaluate_runs(workdirs: Sequence = (), tasks: str | Sequence[str] | None = None, out=None, lm_only=None,
                  data_dir: str | None = None, step: int | str = "best", text_oracle: bool = False,
                  overrides: dict | None = None) -> dict:
    """Evaluate each workdir (a training workdir or an exported model) on `tasks` (default: those of its
    config), plus "<name> (blind)" where its config sets `eval.blind_baseline`, plus `LM_ONLY` when `lm_only`
    names a run whose frozen LM then answers the same prompts from their text alone, plus `TEXT_ORACLE` with
    `text_oracle` (the LM of `lm_only`, else of the first workdir, reading each image's true scene text), plus
    the `CHANCE` row. `overrides` replaces `eval.*` settings of every run (e.g. {"num_examples": 20}). Writes
    the report to `out` (default: the workdir's eval/ when there is one workdir) and returns it.
    """
    workdirs = list(workdirs)
    sources = [(name, w, "model") for name, w in zip(row_names(workdirs), workdirs)]
    sources += [(LM_ONLY, lm_only, "lm_only")] if lm_only else []
    if text_oracle and sources:
        sources.append((TEXT_ORACLE, sources[-1][1], "text_oracle"))
    if not sources:
        raise ValueError("nothing to evaluate: pass at least one workdir (or lm_only)")
    if out is None:
        if len(workdirs) + bool(lm_only) != 1:
            raise ValueError(f"{', '.join(str(p) for _, p, _ in sources)} share one report: pass out=DIR (--out) "
                             "for it (the default, WORKDIR/eval, is for a single workdir)")
        out = paths.path(sources[0][1]) / "eval"
    for _, path, _ in sources:
        paths.preflight(path)
    paths.preflight(out)
    missing = [str(path) for _, path, _ in sources if not paths.path(path).is_dir()]
    if missing:
        raise FileNotFoundError(f"no such run directory: {', '.join(missing)}; pass training workdirs or exported "
                                "model directories")
    settings = [run_settings(path) for _, path, _ in sources]
    for s in settings:  # fail on bad tasks or settings before loading any model
        if data_dir is not None:
            s.data_dir = data_dir
        try:
            s.update(overrides or {})
        except (AttributeError, KeyError) as e:
            raise ValueError(f"unknown eval setting in {overrides} ({e}); known: {', '.join(s)}") from None
        check_settings(tasks or s.tasks, s)
    suites: dict = {}
    rows = []
    keys = [_key(path) for _, path, _ in sources]
    loaded: dict = {}  # a model kept while a later row needs it too (lm_only or the oracle of an evaluated run)
    for i, ((name, path, mode), s) in enumerate(zip(sources, settings)):
        print(f"evaluating {name} ({path})")
        model = loaded.pop(keys[i], None) or load_frozen(path, step)
        if keys[i] in keys[i + 1:]:
            loaded[keys[i]] = model
        if mode != "model" and model.model.variant in TRAINED_LM_VARIANTS:
            raise ValueError(f"{path}: that run trained its LM (variant {model.model.variant!r}), so it cannot stand "
                             "for the frozen LM alone; pass a run whose LM stayed frozen (variant 'frozen' or "
                             "'train_blind') as lm_only")
        task_names = check_settings(tasks or s.tasks, s)
        suite = suites.setdefault((tuple(task_names), s.to_json(), model.image_size),
                                  Suite(task_names, s, model.image_size))
        common = dict(source=str(path), tasks=task_names, settings=s.to_dict())
        rows.append(dict(name=name, kind=mode, **common, **suite.evaluate(model, mode)))
        if mode == "model" and s.blind_baseline:
            print(f"evaluating {name} (blind)")
            rows.append(dict(name=f"{name} (blind)", kind="blind", **common, **suite.evaluate(model, "blind")))
    columns, chance = {}, {}
    for suite in suites.values():
        columns.update({c.name: dataclasses.asdict(c) for c in suite.columns()})
        chance.update(suite.chance())
    rows.append(dict(name=CHANCE, kind="chance", source="", tasks=[], settings=settings[0].to_dict(),
                     scores=chance, details={}))
    report = {"columns": list(columns.values()), "rows": rows}
    for path in write_report(report, out):
        print(f"wrote {path}")
    return report


def write_report(report: dict, out) -> list:
    """`results.json`, `results.md` and (if any column has shots) the plot in directory `out` (local or gs://);
    their paths."""
    out = paths.path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / RESULTS_JSON).write_text(json.dumps(report, indent=1))
    (out / RESULTS_MD).write_text(markdown(report))
    written = [out / RESULTS_JSON, out / RESULTS_MD]
    if any(c["shots"] is not None for c in report["columns"]):
        plot(report, out / PLOT_PNG)
        written.append(out / PLOT_PNG)
    return written


def _cell(row: dict, column: str) -> str:
    if column not in row["scores"]:
        return "–"  # not evaluated
    score = row["scores"][column]
    return "n/a" if score is None else f"{100 * score:.1f}"


def markdown(report: dict) -> str:
    """One table per task: rows = runs and variants, columns = the task's shots (or ways × shots)."""
    lines = ["# Evaluation", "",
             "Accuracy in %. VQA: the official VQAv2 accuracy of short greedy answers; episodes: exact match of the "
             "answer's first word; captions: the share of colour / shape words in generated captions that are right "
             "for the image. \"(blind)\": the same prompts with every image blanked; \"" + LM_ONLY + "\": the frozen "
             "LM on the prompts' text alone; \"" + TEXT_ORACLE + "\": the frozen LM with every image replaced by "
             "the true text of its scene (what the LM could do with a prefix as good as words); \"" + CHANCE + "\": "
             "VQA: always the most frequent answer of the question's type; episodes: 1 / ways; captions: a uniformly "
             "random colour / shape word. –: not evaluated; n/a: does not apply.", ""]
    tasks = list(dict.fromkeys(c["task"] for c in report["columns"]))
    for task in tasks:
        names = [c["name"] for c in report["columns"] if c["task"] == task]
        rows = [r for r in report["rows"] if any(n in r["scores"] for n in names)]
        lines += [f"## {task}", "", "| run | " + " | ".join(n.removeprefix(task + " ") for n in names) + " |",
                  "|---|" + "---:|" * len(names)]
        lines += ["| " + " | ".join([r["name"]] + [_cell(r, n) for n in names]) + " |" for r in rows]
        lines.append("")
    lines += ["## Runs", "", "| run | source | examples per column | seed |", "|---|---|---:|---:|"]
    lines += [f"| {r['name']} | {r['source']} | {r['settings']['num_examples'] or 'all'} | {r['settings']['seed']} |"
              for r in report["rows"] if r["kind"] != "chance"]
    return "\n".join(lines) + "\n"


def plot(report: dict, path) -> None:
    """Accuracy against the number of shots: one panel per series (a task, or a task at one number of ways),
    one line per row; blind, LM-only and text-oracle rows dashed, chance dotted."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    columns = [c for c in report["columns"] if c["shots"] is not None]
    series = list(dict.fromkeys(c["series"] for c in columns))
    ncols = min(3, len(series))
    nrows = -(-len(series) // ncols)
    figure = Figure(figsize=(4.2 * ncols, 3.4 * nrows))
    FigureCanvasAgg(figure)
    axes = figure.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, name in zip(axes, series):
        points = [(c["shots"], c["name"]) for c in columns if c["series"] == name]
        for row in report["rows"]:
            xy = [(shots, row["scores"][column]) for shots, column in points
                  if row["scores"].get(column) is not None]
            if xy:
                shots, scores = zip(*xy)
                chance = row["kind"] == "chance"
                ax.plot(shots, [100 * s for s in scores], marker=None if chance else "o", label=row["name"],
                        color="gray" if chance else None, linestyle=LINE_STYLES.get(row["kind"], "--"))
        ax.set(title=name, xlabel="shots", ylabel="accuracy (%)", xticks=sorted({s for s, _ in points}))
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    for ax in axes[len(series):]:
        ax.axis("off")
    axes[0].legend(fontsize="small")
    figure.tight_layout()
    png = io.BytesIO()
    figure.savefig(png, format="png", dpi=120)
    paths.path(path).write_bytes(png.getvalue())


def write_caption_grid(path, images, captions: Sequence[str], mean, std, columns: int = 4) -> None:
    """A PNG at `path` (local or gs://) of normalised images [N, S, S, 3] (pixels = image * std + mean), each
    with its caption below."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = -(-len(captions) // columns)
    figure = Figure(figsize=(2.6 * columns, 2.9 * rows))
    FigureCanvasAgg(figure)
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    for ax in axes:
        ax.axis("off")
    for ax, image, caption in zip(axes, images, captions):
        ax.imshow(np.clip(np.asarray(image) * np.asarray(std) + np.asarray(mean), 0.0, 1.0))
        ax.set_title(textwrap.fill(caption.strip() or "(empty)", 28), fontsize=8)
    figure.tight_layout()
    png = io.BytesIO()
    figure.savefig(png, format="png", dpi=80)
    path = paths.path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png.getvalue())
