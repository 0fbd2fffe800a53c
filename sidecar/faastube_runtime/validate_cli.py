"""``faastube validate WORKFLOW.yaml``: check a workflow before running it.

Parses the document (every field error, with its path), imports each function's handler
(next to the YAML first, as the worker does), checks that its signature takes the inputs
its edges give it, and calls the entry module's ``make_input()`` if it has one. Exits 0
with a one-line summary, or 2 listing every problem.
"""

from __future__ import annotations

import argparse
import sys

from faastube import errors as ft_errors
from faastube_spec.workflow import load_workflow

from faastube_runtime import validation


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("workflow", help="the workflow YAML (handlers resolve next to it)")


def run(args: argparse.Namespace) -> int:
    try:
        workflow = load_workflow(args.workflow)
    except ft_errors.FaastubeError as e:
        print(f"faastube validate: {e}", file=sys.stderr)
        return 2
    report = validation.check_workflow(workflow)
    if report.problems:
        count = len(report.problems)
        print(f"faastube validate: {args.workflow}: {count} problem{'s' if count != 1 else ''}",
              file=sys.stderr)
        for problem in report.problems:
            print(f"  {problem}", file=sys.stderr)
        return 2
    print(f"OK: workflow {workflow.name!r}: {len(workflow.functions)} functions, {len(workflow.edges)} edges, "
          f"entry {workflow.entry!r}, exit {workflow.exit!r}, SLO {workflow.slo_s * 1000:g} ms; "
          f"every handler imports and takes its inputs; {report.make_input_note}")
    return 0
