"""`python -m tpuserve_kernels paged-attention …` writes artifacts: one shape from flags
(`--out FILE`), or every shape of a JSON list (`--shapes FILE`, as `tpuserve plan
--attention-shapes` prints it; `-` reads stdin) into `--out-dir`, named as the runner looks
them up."""

import argparse
import json
import os
import sys

from tpuserve_kernels import lower


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m tpuserve_kernels")
    sub = p.add_subparsers(dest="kernel", required=True)
    pa = sub.add_parser("paged-attention", help="lower the paged attention kernel for a TPU")
    for name in lower.SHAPE_KEYS[:-1]:
        pa.add_argument(f"--{name.replace('_', '-')}", type=int)
    pa.add_argument("--dtype", choices=sorted(lower.DTYPES), default="bfloat16")
    pa.add_argument("--cache-dtype", choices=sorted(lower.CACHE_DTYPES),
                    help="the KV cache's dtype where it is not --dtype (an fp8 cache)")
    pa.add_argument("--target", default=lower.V6E,
                    help="a TPU device kind (default: %(default)s), or `cpu`: the kernel as "
                         "plain HLO through Pallas' interpreter, for the XLA CPU plugin")
    pa.add_argument("--out", help="artifact file (JSON) of the shape the flags give")
    pa.add_argument("--shapes", help="a JSON list of shapes (`-`: stdin), instead of the flags")
    pa.add_argument("--out-dir", help="with --shapes: where the artifacts go")
    a = p.parse_args(argv)
    if a.shapes:
        if not a.out_dir or a.out:
            p.error("--shapes writes into --out-dir (and takes no --out)")
        text = sys.stdin.read() if a.shapes == "-" else open(a.shapes).read()
        shapes = json.loads(text)
        if not isinstance(shapes, list):
            p.error("--shapes: expected a JSON list of shapes")
    else:
        if not a.out:
            p.error("give --out FILE (one shape from the flags) or --shapes FILE --out-dir DIR")
        shapes = [{k: getattr(a, k) for k in lower.SHAPE_KEYS}]
        if a.cache_dtype:
            shapes[0]["cache_dtype"] = a.cache_dtype
    for shape in shapes:
        why = lower.check_shape(shape)
        if why:
            p.error(f"shape {shape}: {why}")
    for shape in shapes:
        path = a.out or os.path.join(a.out_dir, lower.file_name(shape))
        if a.out_dir:
            os.makedirs(a.out_dir, exist_ok=True)
        art = lower.artifact(shape, target=a.target)
        lower.write(path, art)
        print(f"{path}: {len(art['module'])} bytes of StableHLO, sha256 "
              f"{art['module_sha256'][:16]}", file=sys.stderr)


if __name__ == "__main__":
    main()
