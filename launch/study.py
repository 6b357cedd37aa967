"""Run a small study of a paper's claim and write its report (jaxclip/studies/).

    python launch/study.py --study lift_vs_clip [--quick] [--out studies] [--seed 0]
    python launch/study.py --study all              # the five, one after another
    python launch/study.py --readme-table           # verdicts and wall times of results.json

Writes <out>/<study>/results.json, report.md and PNG plots; training runs go to
<out>/<study>/runs/ (not committed). Studies: lift_vs_clip, positive_pair, caption_quality,
text_grounding, zero_shot_vs_probe.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from absl import flags, logging  # noqa: E402

from jaxclip.studies import STUDIES, StudyError, get, run_study  # noqa: E402


def readme_table(out: Path) -> str:
    lines = [
        "| study | command | verdict | wall time | machine |",
        "|---|---|---|---|---|",
    ]
    for name in STUDIES:
        path = out / name / "results.json"
        command = f"`python launch/study.py --study {name}`"
        if not path.is_file():
            lines.append(f"| {name} | {command} | not run | — | — |")
            continue
        data = json.loads(path.read_text())
        quick = " (quick)" if data["quick"] else ""
        lines.append(
            f"| [{name}]({out.as_posix()}/{name}/report.md) | {command} | "
            f"{data['verdict']['label']}{quick} | {data['wall_s']:.0f} s | "
            f"nproc={data['machine']['nproc']}, load {data['machine'].get('load_end', 0):.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--study", help=f"one of {', '.join(STUDIES)}, or 'all'")
    parser.add_argument("--quick", action="store_true", help="tiny models, a few dozen steps")
    parser.add_argument("--out", default="studies", type=Path, help="output directory")
    parser.add_argument("--seed", default=0, type=int, help="base seed of every run")
    parser.add_argument("--readme-table", action="store_true", help="print the README table")
    args = parser.parse_args(argv)
    if args.readme_table:
        print(readme_table(args.out))
        return 0
    if not args.study:
        parser.error(f"--study is required: one of {', '.join(STUDIES)}, or 'all'")
    names = list(STUDIES) if args.study == "all" else [args.study]
    try:
        for name in names:
            get(name)  # an unknown name fails before anything trains
    except StudyError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    flags.FLAGS.mark_as_parsed()  # grain reads absl flags
    logging.set_verbosity(logging.WARNING)
    for name in names:
        data = run_study(name, args.out, quick=args.quick, seed=args.seed)
        print(
            f"{name}: {data['verdict']['label']} in {data['wall_s']:.0f} s -> "
            f"{args.out / name / 'report.md'}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
