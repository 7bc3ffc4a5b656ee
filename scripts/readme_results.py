"""Rewrite the README's results block from the committed exports (aace.reference.results_markdown), so that the
README's numbers are the book's. Run after an export changes; a test fails while they disagree."""
import sys

from aace import reference

readme = reference.ROOT / "README.md"
text = readme.read_text()
begin, end = text.find(reference.README_BEGIN), text.find(reference.README_END)
if begin < 0 or end < 0:
    sys.exit(f"error: {readme} has no results block (the lines {reference.README_BEGIN!r} ... {reference.README_END!r})")
new = text[:begin] + reference.results_markdown() + text[end + len(reference.README_END):]
if new != text:
    readme.write_text(new)
    print(f"rewrote the results block of {readme}")
else:
    print(f"{readme}: results block up to date")
