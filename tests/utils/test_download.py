"""The released-checkpoint registry and ``python -m mdeq.download``, offline: file:// URLs, a local web server,
corrupted files. Hashes are checked against hashlib computed here, independently of the code under test."""
import dataclasses
import hashlib
import http.server
import os
import re
import threading

import pytest
import torch

from mdeq import download as cli
from mdeq.utils import pretrained

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NAME = "MDEQ_Small_Cls"


@pytest.fixture
def source(tmp_path):
    """A small weights-only checkpoint in the original's layout, its file:// URL and its SHA-256."""
    state = {"fullstage.branches.0.blocks.0.conv1.weight": torch.randn(4, 4, 3, 3),
             "fullstage_copy.branches.0.blocks.0.conv1.weight": torch.randn(4, 4, 3, 3),
             "classifier.weight": torch.randn(10, 8), "classifier.bias": torch.zeros(10)}
    path = tmp_path / "src" / "weights.pkl"
    path.parent.mkdir()
    torch.save(state, str(path))
    data = path.read_bytes()
    return {"path": path, "url": path.as_uri(), "sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}


def _leftovers(folder):
    return sorted(p for p in os.listdir(folder) if p.endswith(".part"))


def test_registry_names_the_four_released_files_with_existing_experiments():
    assert set(pretrained.RELEASED) == {"MDEQ_Small_Cls", "MDEQ_XL_Cls", "MDEQ_Small_Seg", "MDEQ_XL_Seg"}
    for entry in pretrained.RELEASED.values():
        assert os.path.isfile(os.path.join(REPO, entry.cfg)), entry.cfg
        assert entry.task == ("cls" if "/imagenet/" in entry.cfg else "seg")
        assert "_SMALL" in entry.cfg if "Small" in entry.name else "_XL" in entry.cfg
        assert entry.sha256 is None or re.fullmatch(r"[0-9a-f]{64}", entry.sha256)
        assert entry.url.startswith("https://") and entry.page_url.startswith("https://")


def test_list_says_unknown_for_unpublished_hashes(capsys):
    assert cli.main(["--list"]) == 0
    out = capsys.readouterr().out
    for name in pretrained.RELEASED:
        assert name in out
    assert out.count("SHA-256: unknown") == sum(e.sha256 is None for e in pretrained.RELEASED.values())


def test_download_with_expected_hash_writes_the_file_and_prints_the_evaluation_command(tmp_path, source, capsys):
    dest = tmp_path / "pretrained_models"
    assert cli.main([NAME, "--dest", str(dest), "--url", source["url"], "--sha256", source["sha256"]]) == 0
    target = dest / "MDEQ_Small_Cls.pkl"
    assert target.read_bytes() == source["path"].read_bytes()
    assert _leftovers(dest) == []
    lines = capsys.readouterr().out.strip().splitlines()
    assert source["sha256"] in lines[0] and "no published" not in lines[0]
    evaluate = lines[-1].strip()
    assert "cls_valid" in evaluate and "--cfg " in evaluate and "imagenet/cls_mdeq_SMALL.yaml" in evaluate
    assert evaluate.endswith(f"--testModel {target}")


def test_download_without_known_hash_prints_the_computed_one(tmp_path, source, capsys):
    assert cli.main(["MDEQ_XL_Seg", "--dest", str(tmp_path), "--url", source["url"]]) == 0
    out = capsys.readouterr().out
    assert f"SHA-256 {source['sha256']} (no published SHA-256" in out
    assert "seg_test" in out and "cityscapes/seg_mdeq_XL.yaml" in out
    assert (tmp_path / "MDEQ_XL_Seg.pkl").stat().st_size == source["size"]


def test_corrupted_download_is_removed_and_reported_in_one_line(tmp_path, source, capsys):
    good = source["sha256"]
    raw = bytearray(source["path"].read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # one flipped byte
    source["path"].write_bytes(bytes(raw))
    dest = tmp_path / "dest"
    assert cli.main([NAME, "--dest", str(dest), "--url", source["url"], "--sha256", good]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "expected " + good in err
    assert "removed" in err
    assert os.listdir(dest) == []


def test_registry_hash_is_used_when_known(tmp_path, source, monkeypatch, capsys):
    entry = dataclasses.replace(pretrained.RELEASED[NAME], sha256="0" * 64)
    monkeypatch.setitem(pretrained.RELEASED, NAME, entry)
    assert cli.main([NAME, "--dest", str(tmp_path), "--url", source["url"]]) == 2
    assert "expected " + "0" * 64 in capsys.readouterr().err
    assert not (tmp_path / "MDEQ_Small_Cls.pkl").exists() and _leftovers(tmp_path) == []

    entry = dataclasses.replace(entry, sha256=source["sha256"], size=source["size"] + 1)
    monkeypatch.setitem(pretrained.RELEASED, NAME, entry)
    assert cli.main([NAME, "--dest", str(tmp_path), "--url", source["url"]]) == 2
    assert f"has {source['size']} bytes, expected {source['size'] + 1}" in capsys.readouterr().err


def test_unknown_name_and_failed_downloads_are_one_line_errors(tmp_path, capsys):
    assert cli.main(["MDEQ_Huge", "--dest", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "MDEQ_Small_Cls" in err and "MDEQ_XL_Seg" in err

    missing = (tmp_path / "nowhere.pkl").as_uri()
    assert cli.main([NAME, "--dest", str(tmp_path / "d"), "--url", missing]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "could not download MDEQ_Small_Cls" in err
    assert os.listdir(tmp_path / "d") == []

    assert cli.main([NAME, "--dest", str(tmp_path / "d"), "--url", "http://127.0.0.1:9/x.pkl"]) == 2
    assert "could not download" in capsys.readouterr().err

    assert cli.main([NAME, "--dest", str(tmp_path), "--sha256", "abc"]) == 2
    assert "not a SHA-256" in capsys.readouterr().err


class _HtmlPage(http.server.BaseHTTPRequestHandler):
    """Answers like a file host that wants a browser: a web page instead of the file."""

    def do_GET(self):  # noqa: N802 (the http.server name)
        body = b"<html><body>Google Drive can't scan this file for viruses.</body></html>"
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_a_web_page_instead_of_the_file_points_to_the_browser_and_verify(tmp_path, capsys):
    server = http.server.HTTPServer(("127.0.0.1", 0), _HtmlPage)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/download"
        assert cli.main([NAME, "--dest", str(tmp_path), "--url", url]) == 2
    finally:
        server.shutdown()
        server.server_close()
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "web page" in err
    assert pretrained.RELEASED[NAME].page_url in err and "--verify PATH" in err
    assert os.listdir(tmp_path) == []


def test_verify_checks_a_file_fetched_by_hand_and_keeps_it(tmp_path, source, capsys):
    path = str(source["path"])
    assert cli.main([NAME, "--verify", path, "--sha256", source["sha256"]]) == 0
    out = capsys.readouterr().out
    assert "matches the expected SHA-256" in out
    # four tensors in the file, the duplicate equilibrium copy ignored: three weights of the model
    assert "3 weight tensors" in out and "duplicate equilibrium copies ignored" in out
    assert out.strip().splitlines()[-1].strip().endswith(f"--testModel {path}")

    assert cli.main([NAME, "--verify", path, "--sha256", "f" * 64]) == 2
    assert "expected " + "f" * 64 in capsys.readouterr().err
    assert source["path"].exists()

    not_weights = tmp_path / "page.pkl"
    not_weights.write_text("<html>not a checkpoint</html>")
    assert cli.main([NAME, "--verify", str(not_weights)]) == 2
    assert capsys.readouterr().err.startswith("error: ")


def test_an_existing_file_is_checked_not_downloaded_again(tmp_path, source, capsys):
    dest = tmp_path / "pm"
    dest.mkdir()
    (dest / "MDEQ_Small_Cls.pkl").write_bytes(source["path"].read_bytes())
    unreachable = (tmp_path / "gone.pkl").as_uri()
    assert cli.main([NAME, "--dest", str(dest), "--url", unreachable, "--sha256", source["sha256"]]) == 0
    assert "already there" in capsys.readouterr().out
    assert cli.main([NAME, "--dest", str(dest), "--url", unreachable, "--force"]) == 2
    assert (dest / "MDEQ_Small_Cls.pkl").read_bytes() == source["path"].read_bytes()


def test_evaluation_command_outside_a_clone_uses_the_module_and_the_shipped_name():
    entry = pretrained.RELEASED["MDEQ_Small_Seg"]
    assert pretrained.evaluation_command(entry, "w.pkl", in_clone=False) == (
        "python -m mdeq.tools.seg_test --cfg cityscapes/seg_mdeq_SMALL.yaml --testModel w.pkl")
    assert pretrained.evaluation_command(entry, "w.pkl", in_clone=True) == (
        "python tools/seg_test.py --cfg experiments/cityscapes/seg_mdeq_SMALL.yaml --testModel w.pkl")


def test_readmes_list_every_released_file():
    with open(os.path.join(REPO, "README.md")) as fh:
        readme = fh.read()
    with open(os.path.join(REPO, "pretrained_models", "README.md")) as fh:
        folder_readme = fh.read()
    for entry in pretrained.RELEASED.values():
        assert f"| `{entry.name}` |" in readme and f"`{entry.cfg}`" in readme
        assert entry.page_url.split("?")[0] in folder_readme
