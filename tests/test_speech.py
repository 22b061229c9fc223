"""Real speech offline: the Asterisk recordings from Debian packages and the Whisper-base teacher (CTranslate2)."""
import io
import tarfile

import numpy as np
import pytest

from reprolab.data import materialize
from reprolab.tf import speech


def test_debian_package_reader_finds_the_data_tar(tmp_path):
    # an `ar` archive laid out as dpkg-deb writes it: debian-binary, control.tar.xz, data.tar.xz (odd sizes padded)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:xz") as tf:
        payload = b"RIFF-not-really-a-wav"
        info = tarfile.TarInfo("./usr/share/asterisk/sounds/v/x.wav")
        info.size = len(payload)
        tf.addfile(info, io.BytesIO(payload))
    members = [("debian-binary", b"2.0\n"), ("control.tar.xz", b"abc"), ("data.tar.xz", buf.getvalue())]
    raw = b"!<arch>\n"
    for name, data in members:
        raw += f"{name + '/':<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(data):<10}`\n".encode() + data
        raw += b"\n" if len(data) % 2 else b""
    deb = tmp_path / "p.deb"
    deb.write_bytes(raw)
    assert materialize.list_members(deb)[-1] == "./usr/share/asterisk/sounds/v/x.wav"
    assert materialize.read_member(deb, "./usr/share/asterisk/sounds/v/x.wav") == payload
    with pytest.raises(KeyError, match="no member"):
        materialize.read_members(deb, ["./missing.wav"])


def test_six_real_voices_are_materialized_and_the_italian_speakers_share_527_prompts():
    counts = {v: len(speech.asterisk_clips(v)) for v in speech.VOICES}
    assert len(counts) == 6 and min(counts.values()) >= 500, counts
    shared = speech.shared_prompts()
    assert len(shared) == 527 and "digits/5.wav" in shared and "vm-goodbye.wav" in shared
    with pytest.raises(ValueError, match="voice=.*allowed"):
        speech.asterisk_clips("en_GB_m_Nobody")


def test_waves_are_upsampled_to_16k_and_log_mel_matches_whisper_feature_extractor():
    from scipy.io import wavfile

    sr, raw = wavfile.read(speech.SPEECH_DIR / "en_US_f_Allison" / "digits" / "5.wav")
    w = speech.load_wave("en_US_f_Allison", "digits/5.wav")
    assert sr == 8000 and w.dtype == np.float32 and len(w) == 2 * len(raw)
    assert np.allclose(w[::2], raw / 32768.0, atol=0.02)  # the polyphase filter keeps the original samples (nearly)
    mel = speech.log_mel(w)
    ref = speech._feature_extractor()(w, sampling_rate=16000, return_tensors="np").input_features[0]  # (80, 3000)
    assert mel.shape[1] == 80 and mel.shape[0] % 2 == 0 and abs(mel.shape[0] - len(w) / 160) <= 3
    np.testing.assert_array_equal(mel, ref[:, : mel.shape[0]].T)
    # the 30 s window Whisper sees: the clip's frames, then its padding value (all of it, not only the clip)
    np.testing.assert_array_equal(speech.WhisperTeacher._full(mel), ref)
    assert len(speech.load_wave("en_US_f_Allison", "vm-goodbye.wav", max_seconds=0.25)) == 4000
    # log_mel computes over the clip + 800 zeros: the same frames as Whisper's 30 s window, for cut and short clips
    for voice, name, sec in (("it_IT_m_Carlo", "digits/5.wav", 3.0), ("en_US_f_Allison", "vm-goodbye.wav", 0.7)):
        w = speech.load_wave(voice, name, sec)
        full = speech._feature_extractor()(w, sampling_rate=16000, return_tensors="np").input_features[0]
        got = speech.log_mel(w)
        np.testing.assert_array_equal(got, full[:, : len(got)].T)


@pytest.fixture(scope="module")
def teacher():
    return speech.WhisperTeacher()


def test_teacher_is_the_real_whisper_known_transcripts(teacher):
    assert teacher.transcribe(speech.load_wave("en_US_f_Allison", "digits/5.wav")) == "5"
    assert teacher.transcribe(speech.load_wave("en_US_f_Allison", "vm-goodbye.wav")) == "Goodbye."
    assert "arrivederci" in teacher.transcribe(speech.load_wave("it_IT_m_Carlo", "vm-goodbye.wav"), "it").lower()


def test_teacher_states_clip_window_and_padded_window(teacher):
    import ctranslate2

    w = speech.load_wave("it_IT_f_Menardi", "vm-goodbye.wav")
    mel = speech.log_mel(w)
    states = teacher.encode(mel)
    assert states.shape == (mel.shape[0] // 2, 512) and np.isfinite(states).all()
    np.testing.assert_array_equal(states, teacher.encode(mel))  # deterministic
    # window="30s" = the states of the feature extractor's own 30 s input, first T/2 of 1500
    full = speech._feature_extractor()(w, sampling_rate=16000, return_tensors="np").input_features
    ref = np.array(teacher._ct2.encode(ctranslate2.StorageView.from_array(np.ascontiguousarray(full)),
                                       to_cpu=True))[0]
    padded = speech.WhisperTeacher(window="30s")
    np.testing.assert_allclose(padded.encode(mel), ref[: len(states)], rtol=1e-5, atol=1e-5)
    # the clip window is an approximation of it: close in direction, not equal
    cos = (states * ref[: len(states)]).sum(1) / np.linalg.norm(states, axis=1) / np.linalg.norm(ref[: len(states)], axis=1)
    assert 0.5 < cos.mean() < 0.999
    with pytest.raises(ValueError, match="mel: expected"):
        teacher.encode(mel[:-1])
    with pytest.raises(ValueError, match="window=.*allowed"):
        speech.WhisperTeacher(window="10s")
    with pytest.raises(ValueError, match="teacher=.*allowed"):
        speech.WhisperTeacher("whisper-tiny")
