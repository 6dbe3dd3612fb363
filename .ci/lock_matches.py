"""Fail unless the installed packages are exactly the lock's: the versions the tests passed with.

Run with the environment's own Python: `.venv/bin/python .ci/lock_matches.py requirements.lock`.
"""

import re
import sys
from importlib.metadata import distributions

TOOLS = {"interlace", "pip", "uv", "setuptools"}  # the project itself and the installers (uv seeds these)


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def main(lock_path: str) -> int:
    locked = {}
    for line in open(lock_path):
        match = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)", line)
        if match and canonical(match[1]) not in TOOLS:
            locked[canonical(match[1])] = match[2]
    installed = {canonical(d.metadata["Name"]): d.version for d in distributions()}
    installed = {name: version for name, version in installed.items() if name not in TOOLS}
    problems = [f"{name}: locked {version}, installed {installed.get(name, 'nothing')}"
                for name, version in sorted(locked.items()) if installed.get(name) != version]
    problems += [f"{name}: installed {version}, not in the lock" for name, version in sorted(installed.items())
                 if name not in locked]
    if problems:
        print("the environment differs from the lock:\n  " + "\n  ".join(problems))
        return 1
    print(f"the environment is the lock's: {len(locked)} packages at their locked versions")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
