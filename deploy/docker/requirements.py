"""Print the third-party requirements of the server (extras server, models) and the client, one a line.

The images install these in a layer of their own before any source is copied, so an edit to the code or the
README does not reinstall torch; the distributions themselves are then installed with --no-deps.
"""

import tomllib
from pathlib import Path

server = tomllib.loads(Path("pyproject.toml").read_text())
client = tomllib.loads(Path("clients/python/pyproject.toml").read_text())
extras = server["project"]["optional-dependencies"]
lines = [
    *server["project"]["dependencies"],
    *extras["server"],
    *extras["models"],
    *client["project"]["dependencies"],
]
# What `pip install --no-build-isolation` needs to build both distributions.
lines += [*server["build-system"]["requires"], *client["build-system"]["requires"]]
print("\n".join(sorted({line for line in lines if not line.startswith("patchscope")})))
