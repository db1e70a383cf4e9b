"""Online acceptance benchmark against a running OpenAI-compatible server.

The same as `sglang-dflash bench online`; run with --help for the options. Example:

    python benchmarks/online_acceptance.py --url http://127.0.0.1:30000 \
        --baseline-url http://127.0.0.1:30001 --concurrency 1,4,16,32 --out out/online
"""

import argparse
import sys

from sglang_dflash.bench.online import add_online_args, main_online


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="online_acceptance.py")
    add_online_args(parser)
    return main_online(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
