"""The package version, and the versions a run records; a leaf module."""

__version__ = "0.1.0"

RECORDED = ("loramix", "torch", "transformers", "peft")  # what a run's results.json names


def installed_versions(names: tuple[str, ...] = RECORDED) -> dict[str, str]:
    """{distribution: its installed version, or "not installed"} (the demo and recipes record them)."""
    from importlib import metadata

    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions
