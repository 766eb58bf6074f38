"""The board's chat worker: the model lives in this process, never in the board's.

    python -m tuneline.board.chat_worker MODEL [BASE]

MODEL is a merged model folder, an export folder, a .gguf file or a LoRA adapter folder on BASE (as for
`tuneline chat`). Reads one JSON
request per line on stdin ({"text", "system", "generation": {key: value}, "clear"}) and answers with JSON lines on
stdout: {"piece": "..."} as tokens are generated, then {"done": true, "answer": "..."} (or {"error": ...}).
"""

from __future__ import annotations

import json
import sys


class Pieces:
    """A file-like stream for Chat.reply that writes each piece as a JSON line."""

    def write(self, piece: str) -> None:
        sys.stdout.write(json.dumps({"piece": piece}) + "\n")

    def flush(self) -> None:
        sys.stdout.flush()


def main(argv=None) -> int:
    from ..chat import Chat
    from ..config import defaults
    from ..generation import generation_kwargs

    args = argv or sys.argv[1:]
    model, base = args[0], (args[1] if len(args) > 1 else None)
    try:
        chat = Chat(model, base=base)
    except Exception as err:  # noqa: BLE001 (reported to the page, which shows it)
        print(json.dumps({"error": str(err)}), flush=True)
        return 1
    print(json.dumps({"ready": model}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        if request.get("clear"):
            chat.history = []
        chat.system = request.get("system", "") or ""
        chat.generation = generation_kwargs({**defaults(), **request.get("generation", {})})  # checked by the board
        try:
            answer = chat.reply(request["text"], stream=Pieces())
            print(json.dumps({"done": True, "answer": answer}), flush=True)
        except Exception as err:  # noqa: BLE001
            print(json.dumps({"error": str(err)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
