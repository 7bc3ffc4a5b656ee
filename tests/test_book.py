"""The book's build helpers (the executed pages themselves are checked by nbval and test_book_html)."""
import nbformat
import pytest

from aace.book import NOTEBOOK_DIR, NOTEBOOKS, hide_parameter_cells


def test_parameter_cells_are_removed_from_the_rendered_page_but_kept_in_the_notebook(tmp_path):
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("profile = 'cpu'", metadata={"tags": ["parameters"]}),
                nbformat.v4.new_code_cell("profile = 'smoke'", metadata={"tags": ["injected-parameters"]}),
                nbformat.v4.new_code_cell("print(profile)")]
    path = tmp_path / "page.ipynb"
    nbformat.write(nb, str(path))
    hide_parameter_cells(path)
    hide_parameter_cells(path)  # idempotent
    cells = nbformat.read(str(path), as_version=4).cells
    assert [c.metadata.get("tags", []) for c in cells] == [["parameters", "remove-cell"],
                                                          ["injected-parameters", "remove-cell"], []]
    assert [c.source for c in cells] == ["profile = 'cpu'", "profile = 'smoke'", "print(profile)"]


def test_every_page_declares_its_parameters_in_one_tagged_cell():
    for name in NOTEBOOKS:
        cells = nbformat.read(str(NOTEBOOK_DIR / f"{name}.ipynb"), as_version=4).cells
        tagged = [c for c in cells if "parameters" in c.metadata.get("tags", [])]
        assert len(tagged) == 1 and "profile" in tagged[0].source, name


@pytest.mark.parametrize("remote, url", [
    ("https://github.com/someone/aace-book.git", "https://github.com/someone/aace-book"),
    ("https://user:token@gitlab.com/group/aace", "https://gitlab.com/group/aace"),
    ("git@github.com:someone/aace-book.git", "https://github.com/someone/aace-book"),
    ("ssh://git@github.com/someone/aace-book.git", "https://github.com/someone/aace-book"),
    ("/work/main", None), ("", None), (None, None),
])
def test_the_repository_link_is_the_clone_s_own_origin_and_never_a_local_path(remote, url):
    from aace.book import repository_url
    assert repository_url(remote) == url
