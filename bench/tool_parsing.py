"""Cost of reading tool calls out of a streamed reply (api/tools/streaming.py), per delta.

A reply of ~800 characters of text followed by one hermes-style call, fed in 4-character
deltas (about a token each), through the streamer the chat endpoint runs per choice; the
same deltas through a plain string concatenation (what a reply without tools costs) are the
baseline measured in the same run.

    python bench/tool_parsing.py [--repeats 2000]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere in the repo

from api.tools import ToolStreamer, get_parser  # noqa: E402

REPLY = "Let me think about this step by step. " * 20 + (
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>')


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=2000)
    args = ap.parse_args()
    deltas = [REPLY[i : i + 4] for i in range(0, len(REPLY), 4)]

    def with_tools() -> None:
        s = ToolStreamer(get_parser("hermes"))
        for d in deltas:
            s.feed(d)
        s.finish()

    def plain() -> None:
        out = ""
        for d in deltas:
            out += d

    for name, fn in (("plain", plain), ("tools", with_tools)):
        t0 = time.perf_counter()
        for _ in range(args.repeats):
            fn()
        per = (time.perf_counter() - t0) / args.repeats
        print(f"{name}: {per * 1e6:8.1f} us per reply, {per / len(deltas) * 1e6:6.2f} us per delta "
              f"({len(deltas)} deltas)")


if __name__ == "__main__":
    main()
