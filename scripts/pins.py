"""The record digest of each reference testbed's export beside the one aace.reference pins: what to write into
aace/reference.py after an export was deliberately remade. ``--write-fixtures`` rewrites the pins of the smoke
testbeds (the nbval fixture's exports, remade by `make nbval-fixture`); the reference studies' pins are changed by
hand, in review."""
import json
import re
import sys

from aace import reference

write = "--write-fixtures" in sys.argv[1:]
source = (reference.ROOT / "aace" / "reference.py").read_text()
for profile, beds in reference.REFERENCES.items():
    for key, bed in beds.items():
        path = reference.ROOT / bed.export / "study.json"
        digest = json.loads(path.read_text())["digest"] if path.is_file() else None
        state = ("not pinned yet (no complete export)" if bed.digest is None else
                 "pinned" if digest == bed.digest else "DIFFERS from the pin")
        if write and profile == "smoke" and digest and digest != bed.digest:
            source, n = re.subn(re.escape(bed.digest), digest, source)
            state = f"pin rewritten ({n})"
        print(f"{profile:6} {key:6} {bed.export:45} {digest} {state}")
if write:
    (reference.ROOT / "aace" / "reference.py").write_text(source)
