"""A few chat exchanges with a trained model about test media of the built-in world.

``python -m mmfuse.demo_chat --model runs/demo/model --world data/world``
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mmfuse.chat import ChatSession
from mmfuse.generation import GenerationConfig
from mmfuse.model_dir import load_model_dir

# (task of the test record whose media we use, follow-up questions about the same media)
EXCHANGES = [
    ("image/caption", ["How many shapes are there?"]),
    ("audio/caption", ["Is the sound low, middle or high?", "What kind of wave is it?"]),
    ("both/total", ["Are there as many beeps as shapes?"]),
]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", required=True, help="model directory")
    parser.add_argument("--world", required=True, help="world directory (test.jsonl)")
    args = parser.parse_args(argv)
    model, processor = load_model_dir(args.model)
    world = Path(args.world)
    records = [json.loads(line) for line in (world / "test.jsonl").open()]
    session = ChatSession(model, processor, GenerationConfig(max_new_tokens=48))
    for task, follow_ups in EXCHANGES:
        record = next(r for r in records if r["task"] == task)
        session.reset()
        parts = record["messages"][0]["content"]
        media = [p for p in parts if p["type"] != "text"]
        question = next(p["text"] for p in parts if p["type"] == "text")
        print(f"\n--- chat about {', '.join(p['path'] for p in media)} ---")
        for part in media:
            session.attach(part["type"], str(world / part["path"]))
        for text in [question, *follow_ups]:
            print(f"you> {text}")
            print(f"mmfuse> {session.ask(text)}")
        reference = record["messages"][-1]["content"][0]["text"]
        print(f"(reference for the first question: {reference})")


if __name__ == "__main__":
    main()
