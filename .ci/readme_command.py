"""Print one of README.md's CI-run commands: ``python .ci/readme_command.py main|test``.

README.md marks each with an HTML comment (``<!-- ci:main-command ... -->``,
``<!-- ci:test-command -->``) right above a fenced block of one line. CI runs what this
prints, so the README and CI cannot drift apart. ``main --install`` prints the main
command less its final ``&& lightning train`` (CI runs a short training instead).
"""

import re
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def command(name: str) -> str:
    text = README.read_text()
    m = re.search(rf"<!-- ci:{name}-command\b[^>]*-->\s*```bash\n(.*?)\n```", text, re.S)
    if m is None:
        sys.exit(f"README.md has no '<!-- ci:{name}-command -->' marker above a ```bash block")
    lines = [x for x in m.group(1).splitlines() if x.strip()]
    if len(lines) != 1:
        sys.exit(f"README.md's {name} command must be one line, found {len(lines)}")
    return lines[0].strip()


def main(argv: list[str]) -> None:
    if not argv or argv[0] not in ("main", "test"):
        sys.exit("usage: readme_command.py main [--install] | test")
    cmd = command(argv[0])
    if argv[1:] == ["--install"]:
        head, sep, tail = cmd.rpartition("&&")
        if not sep or not tail.strip().startswith("lightning train"):
            sys.exit(f"README.md's main command does not end with '&& lightning train': {cmd}")
        cmd = head.strip()
    print(cmd)


if __name__ == "__main__":
    main(sys.argv[1:])
