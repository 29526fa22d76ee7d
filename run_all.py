"""Run the numbered notebooks in order, headless, with one set of parameters.

    python run_all.py                                   # the built-in demo data, end to end
    python run_all.py -p data_dir ../shared/data/cusehacks-track1 -p category 2
    python run_all.py -p epochs 2 --only 00 01          # a subset

Each `-p NAME VALUE` goes to every notebook whose parameters cell declares NAME (values are read
as Python literals when they parse, as strings otherwise, as papermill's own CLI does). Executed
notebooks are written to <output_dir>/executed/. The first failing cell stops the run with its error.
"""
from __future__ import annotations

import argparse
import ast
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent
NOTEBOOKS = REPO / "notebooks"


def parse_value(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def notebooks(only=None) -> list[Path]:
    nbs = sorted(p for p in NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))
    return [p for p in nbs if not only or p.name[:2] in only]


def absolute_paths(params: dict) -> dict:
    """The notebooks run in notebooks/, so the paths given here are made absolute from the caller's folder
    first: output_dir, data_dir and class_names always, pretrained (or each entry of a list of them) only
    when it names a file (otherwise it is the name of a weights set)."""
    params = dict(params)
    params["output_dir"] = str(Path(params.get("output_dir") or REPO / "outputs").expanduser().resolve())
    for k in ("data_dir", "class_names"):
        if isinstance(params.get(k), (str, Path)) and str(params[k]):
            params[k] = str(Path(params[k]).expanduser().resolve())
    def weights(w):
        return str(Path(w).expanduser().resolve()) if isinstance(w, str) and Path(w).expanduser().is_file() else w
    w = params.get("pretrained")
    if w is not None:
        params["pretrained"] = [weights(x) for x in w] if isinstance(w, (list, tuple)) else weights(w)
    return params


def run(params: dict, only=None, kernel="python3", log_output=False) -> list[Path]:
    import papermill as pm

    params = absolute_paths(params)
    out_dir = Path(params["output_dir"])
    executed = []
    for nb in notebooks(only):
        declared = pm.inspect_notebook(str(nb))
        mine = {k: v for k, v in params.items() if k in declared}
        target = out_dir / "executed" / nb.name
        target.parent.mkdir(parents=True, exist_ok=True)
        t = time.time()
        print(f"== {nb.name} {mine}", flush=True)
        try:
            pm.execute_notebook(str(nb), str(target), parameters=mine, cwd=str(NOTEBOOKS), kernel_name=kernel,
                                log_output=log_output, progress_bar=False)
        except pm.PapermillExecutionError as e:
            raise SystemExit(f"{nb.name} failed in cell {e.exec_count}: {e.ename}: {e.evalue}\n"
                             f"(executed notebook with the traceback: {target})") from None
        print(f"   done in {time.time() - t:.0f} s -> {target}", flush=True)
        executed.append(target)
    unknown = set(params) - {k for nb in notebooks(only) for k in pm.inspect_notebook(str(nb))}
    if unknown:
        print(f"note: no notebook declares {sorted(unknown)}", file=sys.stderr)
    return executed


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-p", "--parameter", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"))
    ap.add_argument("--only", nargs="*", help="notebook numbers to run, e.g. 00 01")
    ap.add_argument("--kernel", default="python3")
    ap.add_argument("--log-output", action="store_true", help="stream each cell's output")
    a = ap.parse_args(argv)
    run({k: parse_value(v) for k, v in a.parameter}, a.only, a.kernel, a.log_output)


if __name__ == "__main__":
    main()
