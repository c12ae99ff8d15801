"""What an error says, in the one line a per-case message has room for."""

from __future__ import annotations

import re

# ITK and SimpleITK put the reason on a later line, after the C++ source file and line number that threw
# ("Exception thrown in SimpleITK ImageFileReader_Execute: .../itkNiftiImageIO.cxx:2135:\nITK ERROR: ..."),
# and ITK prefixes it with the throwing object's class and address.
_TOOLKIT_REASON = re.compile(r"^(?:ITK ERROR|sitk::ERROR): (?:\w+\(0x[0-9a-fA-F]+\): )?(?:ERROR: )?(.+)$",
                             re.MULTILINE)


def one_line(err: BaseException) -> str:
    """The line of ``err``'s message that says what went wrong, whitespace collapsed: ITK's and SimpleITK's
    reason rather than the source location above it, else the first non-empty line, else the error's type."""
    text = str(err).strip()
    if not text:
        return type(err).__name__
    reason = _TOOLKIT_REASON.search(text)
    line = reason.group(1) if reason else text.splitlines()[0]
    return " ".join(line.split())
