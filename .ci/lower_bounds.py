"""Print `name==lower` for each dependency of pyproject.toml that has a lower bound (the 'oldest' set)."""
import re
import sys

text = open("pyproject.toml", encoding="utf-8").read()
block = re.search(r"^dependencies = \[(.*?)^\]", text, re.S | re.M)
if block is None:
    sys.exit("pyproject.toml: no dependencies list")
for spec in re.findall(r'"([^"]+)"', block[1]):
    m = re.match(r"([A-Za-z0-9_.\-]+)\s*(?:\[.*?\])?\s*>=\s*([^,;\s]+)", spec)
    if m is None:
        sys.exit(f"pyproject.toml: dependency {spec!r} has no lower bound")
    print(f"{m[1]}=={m[2]}")
