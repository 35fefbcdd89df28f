"""YAML files whose errors name the key and its line: the value (PyYAML's safe loader) with a table from each
key path ("experts[0].lora.rank") to the line it is written on (from PyYAML's composed node tree)."""

from __future__ import annotations

import os


class YamlError(ValueError):
    """A YAML file, or a key in it, that cannot be used: 'FILE:LINE: KEY: reason'."""


class YamlFile:
    """A parsed YAML file: `value` (plain dicts, lists and scalars) and the line of every key path."""

    def __init__(self, path: str) -> None:
        import yaml

        self.path = path
        try:
            with open(os.path.expanduser(path), encoding="utf-8") as f:
                text = f.read()
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: no such file") from None
        except UnicodeDecodeError as e:
            raise YamlError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        try:
            node = yaml.compose(text, Loader=yaml.SafeLoader)
            self.value = yaml.safe_load(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f"{path}:{mark.line + 1}" if mark is not None else path
            raise YamlError(f"{where}: not valid YAML: {getattr(e, 'problem', None) or e}") from None
        self.lines: dict[str, int] = {}
        if node is not None:
            self._walk(node, "")

    def _walk(self, node, prefix: str) -> None:
        import yaml

        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                path = f"{prefix}.{key.value}" if prefix else str(key.value)
                self.lines.setdefault(path, key.start_mark.line + 1)
                self._walk(value, path)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                path = f"{prefix}[{i}]"
                self.lines.setdefault(path, item.start_mark.line + 1)
                self._walk(item, path)

    def line_of(self, key: str) -> int | None:
        """The line of `key`, else of its nearest enclosing key that is written in the file (a missing key)."""
        while key:
            if key in self.lines:
                return self.lines[key]
            cut = max(key.rfind("."), key.rfind("["))
            key = key[:cut] if cut > 0 else ""
        return None

    def error(self, key: str, message: str) -> YamlError:
        """'FILE:LINE: KEY: message' (the line of the key, or of where it is missing)."""
        line = self.line_of(key)
        where = f"{self.path}:{line}" if line is not None else self.path
        return YamlError(f"{where}: {key}: {message}" if key else f"{where}: {message}")
