"""The one exception type users see, and the wrapper that turns it into one line on stderr."""
from __future__ import annotations

import os
import re
import sys
from typing import Callable


class DQError(Exception):
    """A problem with the user's input: params, data files, checkpoints, disk.

    The message is one line that names the key or file and says what was expected. Stage entry
    points print it as `error: <message>` and exit with status 1; `DQ_DEBUG=1` shows the traceback.
    """


def _log_stage_start() -> None:
    """Append the entry point's name to the file $DQ_STAGE_LOG, when set.

    The team tests use it to prove that DVC restored a stage from a cache instead of running it.
    """
    log = os.environ.get("DQ_STAGE_LOG")
    if log:
        with open(log, "a", encoding="utf-8") as f:
            f.write(os.path.splitext(os.path.basename(sys.argv[0]))[0] + "\n")


def first_line(exc: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message (or its type), for one-line errors."""
    text = str(exc).strip()
    return text.splitlines()[0][:limit] if text else type(exc).__name__


def worker_message(exc: BaseException) -> str:
    """The message of an error, also when a DataLoader worker raised it.

    torch re-raises a worker's exception in the main process as the same type whose message is
    "Caught X in DataLoader worker process k." followed by the worker's whole traceback; the original
    message is the traceback's last line, after "module.X: ".
    """
    text = str(exc)
    if text.startswith("Caught ") and "Original Traceback" in text:
        last = text.strip().splitlines()[-1]
        match = re.match(r"^[\w.]+: (.*)$", last)
        if match:
            return match.group(1)
    return text


def run_cli(main: Callable[[], None]) -> None:
    """Call `main` and turn a DQError (or an OSError such as a full disk) into one error line."""
    _log_stage_start()
    if os.environ.get("DQ_DEBUG") == "1":
        main()
        return
    try:
        main()
    except DQError as exc:
        print(f"error: {worker_message(exc)}", file=sys.stderr)
        raise SystemExit(1) from None
    except OSError as exc:
        where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
        print(f"error: {exc.strerror or exc}{where}", file=sys.stderr)
        raise SystemExit(1) from None
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    except MemoryError:
        print("error: out of memory; lower the batch_size of this stage or data.train_limit", file=sys.stderr)
        raise SystemExit(1) from None
    except Exception as exc:  # a bug, not bad input: still one line, with the way to see more
        detail = first_line(exc, 300) if str(exc).strip() else ""
        print(f"error: internal error {type(exc).__name__}: {detail} (set DQ_DEBUG=1 for the traceback)",
              file=sys.stderr)
        raise SystemExit(2) from None
