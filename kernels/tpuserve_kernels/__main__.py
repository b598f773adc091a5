"""`python -m tpuserve_kernels paged-attention --out FILE --tiles … ` writes one artifact."""

import argparse
import sys

from tpuserve_kernels import lower


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m tpuserve_kernels")
    sub = p.add_subparsers(dest="kernel", required=True)
    pa = sub.add_parser("paged-attention", help="lower the paged attention kernel for a TPU")
    for name in ("tiles", "kv-heads", "rows", "group", "head-dim", "page-size", "pages",
                 "table-pages", "chunk-pages"):
        pa.add_argument(f"--{name}", type=int, required=True)
    pa.add_argument("--dtype", choices=sorted(lower.DTYPES), default="bfloat16")
    pa.add_argument("--target", default=lower.V6E, help="device kind (default: %(default)s)")
    pa.add_argument("--out", required=True, help="artifact file (JSON)")
    a = p.parse_args(argv)
    shape = {k: getattr(a, k) for k in ("tiles", "kv_heads", "rows", "group", "head_dim",
                                        "page_size", "pages", "table_pages", "chunk_pages",
                                        "dtype")}
    for k, v in shape.items():
        if k != "dtype" and v <= 0:
            p.error(f"--{k.replace('_', '-')} must be positive, got {v}")
    if shape["table_pages"] % shape["chunk_pages"]:
        p.error("--table-pages must be a multiple of --chunk-pages")
    art = lower.artifact(shape, target=a.target)
    lower.write(a.out, art)
    print(f"{a.out}: {len(art['module'])} bytes of StableHLO, sha256 {art['module_sha256'][:16]}",
          file=sys.stderr)


if __name__ == "__main__":
    main()
