"""The one exception type users see, and the wrapper that turns it into one line on stderr."""
from __future__ import annotations

import os
import sys
from typing import Callable


class DQError(Exception):
    """A problem with the user's input: params, data files, checkpoints, disk.

    The message is one line that names the key or file and says what was expected. Stage entry
    points print it as `error: <message>` and exit with status 1; `DQ_DEBUG=1` shows the traceback.
    """


def run_cli(main: Callable[[], None]) -> None:
    """Call `main` and turn a DQError (or an OSError such as a full disk) into one error line."""
    if os.environ.get("DQ_DEBUG") == "1":
        main()
        return
    try:
        main()
    except DQError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    except OSError as exc:
        where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
        print(f"error: {exc.strerror or exc}{where}", file=sys.stderr)
        raise SystemExit(1) from None
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        raise SystemExit(130) from None
