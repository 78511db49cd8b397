"""Which model versions to load and unload next: the version policy, a pure function of what is on disk
and what is loaded (no TensorFlow, no file system; serving/models.py scans, loads and unloads).

As TF Serving splits it: the policy `latest { num_versions }` names the versions wanted (aspired,
in TF Serving's words), and an availability-preserving policy
(tensorflow_serving/core/availability_preserving_policy.cc) moves towards them one action at a
time, loading before unloading so that the model never goes unserved. Unlike TF Serving's, it
unloads nothing until a wanted version is loaded: a newer version that fails to load, one still
being copied in, or an emptied base path leave the loaded versions serving.
Version labels do not keep a version loaded (nor do they in TF Serving): they name loaded versions.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

LOAD, UNLOAD = "load", "unload"


@dataclass(frozen=True)
class Action:
    kind: str  # LOAD or UNLOAD
    version: int


@dataclass(frozen=True)
class Versions:
    """What the policy decides from: the versions on disk and what became of them."""

    on_disk: frozenset[int]
    loaded: frozenset[int] = frozenset()
    # Failed to load as they are on disk now: not tried again until their directory changes.
    failed: frozenset[int] = frozenset()
    # Changed since the previous scan (the Pusher copies file by file): not loaded until they settle.
    unsettled: frozenset[int] = frozenset()

    @staticmethod
    def of(on_disk: Collection[int], loaded: Collection[int] = (), failed: Collection[int] = (),
           unsettled: Collection[int] = ()) -> "Versions":
        return Versions(frozenset(on_disk), frozenset(loaded), frozenset(failed), frozenset(unsettled))


def wanted_versions(on_disk: Collection[int], num_versions: int) -> list[int]:
    """The versions the policy wants loaded: the newest `num_versions` on disk, oldest first."""
    return sorted(sorted(on_disk, reverse=True)[:num_versions])


def next_action(versions: Versions, num_versions: int) -> Action | None:
    """The next step towards the wanted versions, or None when there is nothing to do.

    First load each wanted version that is not loaded (oldest first), unless it failed as it is
    or is still settling; then, once at least one wanted version is loaded, unload the loaded
    versions no longer wanted (oldest first).
    """
    wanted = wanted_versions(versions.on_disk, num_versions)
    for version in wanted:
        if version not in versions.loaded | versions.failed | versions.unsettled:
            return Action(LOAD, version)
    if versions.loaded.isdisjoint(wanted):
        return None  # nothing wanted is loaded: keep serving what is
    unwanted = sorted(versions.loaded.difference(wanted))
    return Action(UNLOAD, unwanted[0]) if unwanted else None
