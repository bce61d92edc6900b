"""Chat in a terminal with a served model: streamed answers, history, `clear`, `exit`, Ctrl-C stops an answer.

    python chat_generation.py                               # the demo export, served in this process
    python chat_generation.py --url http://127.0.0.1:8000   # a running serve_generation.py
    python chat_generation.py --help                        # every flag
"""
from infer.chat_cli import main

if __name__ == "__main__":
    main()
