"""The record digest of each reference testbed's export beside the one aace.reference pins: what to write into
aace/reference.py after an export was deliberately remade (a reference study, or `make nbval-fixture`)."""
import json

from aace import reference

for profile, beds in reference.REFERENCES.items():
    for key, bed in beds.items():
        path = reference.ROOT / bed.export / "study.json"
        digest = json.loads(path.read_text())["digest"] if path.is_file() else None
        state = "pinned" if digest == bed.digest else "DIFFERS from the pin"
        print(f"{profile:6} {key:6} {bed.export:45} {digest} {state}")
