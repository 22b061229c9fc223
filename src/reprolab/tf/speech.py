"""Real speech offline: the Asterisk prompt recordings and the Whisper-base encoder as a pretrained teacher.

- Audio: ``data/speech/asterisk/<voice>/`` holds six real voices from Debian packages (``reprolab.data.sources``):
  one take per telephone prompt (527-599 prompts a voice, 8 kHz 16-bit mono WAV, CC-BY-SA-3.0). The two Italian voices
  (it_IT_m_Carlo, male; it_IT_f_Menardi, female) read 527 of the same prompts, so a prompt spoken by one can be
  looked up among the other's (query-by-example across speakers, :func:`shared_prompts`). en_US and es_MX are the same
  speaker (Allison) in two languages.
- :func:`load_wave` reads a clip at 16 kHz (8 kHz upsampled by ``scipy.signal.resample_poly``); :func:`log_mel` gives
  Whisper's 80-d log-mel frames (``transformers.WhisperFeatureExtractor``, 100 frames a second) cut to the clip's length.
- :class:`WhisperTeacher` is the real pretrained teacher: the Whisper-base encoder (OpenAI, MIT). Offline it is the
  CTranslate2 conversion in ``models/whisper-base`` (the ``model_cache`` stage), which returns the last encoder layer
  only, 512-d at 50 states a second; online, ``"openai/whisper-base"`` loads the same weights with transformers.
  Whisper was trained on zero-padded 30 s windows; ``window="clip"`` encodes a clip over a window of its own length
  (the ``audio_ctx`` shortcut of whisper.cpp: ~15x cheaper, slightly different states), ``window="30s"`` pads as
  Whisper does and keeps the clip's states.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np

from ..data.sources import ASTERISK_VOICES
from ..paths import DATA_DIR, MODELS_DIR

SR = 16000
HOP = 160                      # Whisper's mel hop: 100 frames a second; the encoder halves it to 50 states a second
VOICES = tuple(ASTERISK_VOICES)
SPEECH_DIR = DATA_DIR / "speech" / "asterisk"
WINDOWS = ("clip", "30s")
TEACHERS = ("whisper-base", "openai/whisper-base")


def _voice_dir(voice: str) -> Path:
    if voice not in VOICES:
        raise ValueError(f"voice={voice!r}; allowed: {', '.join(VOICES)}")
    path = SPEECH_DIR / voice
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is missing: run `make data`")
    return path


def asterisk_clips(voice: str) -> list[str]:
    """The prompt names of one voice (paths relative to its folder, e.g. ``digits/5.wav``), sorted."""
    root = _voice_dir(voice)
    return sorted(str(p.relative_to(root)) for p in root.rglob("*.wav"))


def shared_prompts(a: str = "it_IT_m_Carlo", b: str = "it_IT_f_Menardi") -> list[str]:
    """Prompts that both voices read (527 for the two Italian speakers), sorted."""
    return sorted(set(asterisk_clips(a)) & set(asterisk_clips(b)))


def load_wave(voice: str, name: str, max_seconds: float | None = None) -> np.ndarray:
    """One clip as float32 in [-1, 1] at 16 kHz, cut to ``max_seconds`` if given."""
    from math import gcd

    from scipy.io import wavfile
    from scipy.signal import resample_poly

    sr, w = wavfile.read(_voice_dir(voice) / name)
    w = w.astype(np.float32) / (32768.0 if w.dtype == np.int16 else 1.0)
    if w.ndim > 1:
        w = w.mean(axis=1)
    if sr != SR:
        g = gcd(SR, sr)
        w = resample_poly(w, SR // g, sr // g).astype(np.float32)
    if max_seconds is not None:
        w = w[: int(round(max_seconds * SR))]
    return np.ascontiguousarray(w, dtype=np.float32)


@lru_cache(maxsize=1)
def _feature_extractor():
    from transformers import WhisperFeatureExtractor

    return WhisperFeatureExtractor(feature_size=80)


def log_mel(wave: np.ndarray) -> np.ndarray:
    """Whisper's log-mel features of a clip (<= 30 s), (T, 80) float32, T even, about 100 x seconds + 2: the frames
    of Whisper's zero-padded 30 s window, computed over the clip plus 800 zero samples only (every kept frame's
    window lies inside that, and zeros never set the maximum the normalisation clamps to; tested equal)."""
    feats = _feature_extractor()(wave.astype(np.float32), sampling_rate=SR, return_tensors="np",
                                 max_length=len(wave) + 800).input_features[0]
    n = int(np.ceil(len(wave) / HOP)) + 1  # every frame whose window reaches into the clip
    n = min(3000, n + n % 2)
    return np.ascontiguousarray(feats[:, :n].T, dtype=np.float32)


@lru_cache(maxsize=1)
def _tokenizer():
    import tokenizers

    return tokenizers.Tokenizer.from_file(str(MODELS_DIR / "whisper-base" / "tokenizer.json"))


class WhisperTeacher:
    """Whisper-base encoder: ``encode(mel (T, 80)) -> (T/2, 512)`` last-layer states; ``transcribe(wave)`` for a
    known-output check. ``name``: ``whisper-base`` (offline, CTranslate2) or ``openai/whisper-base`` (online)."""

    def __init__(self, name: str = "whisper-base", window: str = "clip", threads: int = 2):
        if name not in TEACHERS:
            raise ValueError(f"teacher={name!r}; allowed: {', '.join(TEACHERS)}")
        if window not in WINDOWS:
            raise ValueError(f"window={window!r}; allowed: {', '.join(WINDOWS)}")
        self.name, self.window, self.dim = name, window, 512
        if name == "whisper-base":
            import ctranslate2

            path = MODELS_DIR / "whisper-base"
            if not (path / "model.bin").exists():
                raise FileNotFoundError(f"{path} is missing: run `make models` (dvc repro model_cache) first")
            self._ct2 = ctranslate2.models.Whisper(str(path), device="cpu", compute_type="float32",
                                                   intra_threads=threads, inter_threads=1)
            self._hf = None
        else:
            import torch
            from transformers import WhisperForConditionalGeneration, WhisperProcessor

            self._hf = WhisperForConditionalGeneration.from_pretrained(name, dtype=torch.float32).eval()
            self._processor = WhisperProcessor.from_pretrained(name)
            self._ct2 = None

    @staticmethod
    def _full(mel: np.ndarray) -> np.ndarray:
        """(80, 3000): the clip's frames, then the value Whisper's zero-padded audio takes after its normalisation
        (log10 clamped at 8 below the window's maximum, then (x + 4) / 4: the floor max - 2, or -1.5 for silence)."""
        out = np.full((80, 3000), max(float(mel.max()) - 2.0, -1.5), dtype=np.float32)
        out[:, : len(mel)] = mel.T
        return out

    def encode(self, mel: np.ndarray) -> np.ndarray:
        """Last-layer encoder states (T/2, 512) float32 of one clip's log-mel frames (T, 80), T even, T <= 3000."""
        if mel.ndim != 2 or mel.shape[1] != 80 or mel.shape[0] % 2 or not 2 <= mel.shape[0] <= 3000:
            raise ValueError(f"mel: expected (T, 80) with T even in [2, 3000], got {mel.shape}")
        n = mel.shape[0] // 2
        x = self._full(mel) if self.window == "30s" else mel.T
        x = np.ascontiguousarray(x[None], dtype=np.float32)
        if self._ct2 is not None:
            import ctranslate2

            out = np.array(self._ct2.encode(ctranslate2.StorageView.from_array(x), to_cpu=True))[0]
        else:
            import torch

            if self.window != "30s":
                raise ValueError("window='clip' is offline-only (transformers' Whisper encoder needs 3000 frames); "
                                 "use window='30s' with openai/whisper-base")
            with torch.no_grad():
                out = self._hf.model.encoder(torch.from_numpy(x)).last_hidden_state[0].numpy()
        return np.ascontiguousarray(out[:n], dtype=np.float32)

    def transcribe(self, wave: np.ndarray, language: str = "en") -> str:
        """Greedy transcript of a clip (<= 30 s), for checking that the teacher is the real model."""
        mel = self._full(log_mel(wave[: 30 * SR]))[None].astype(np.float32)
        if self._ct2 is not None:
            import ctranslate2

            prompt = ["<|startoftranscript|>", f"<|{language}|>", "<|transcribe|>", "<|notimestamps|>"]
            res = self._ct2.generate(ctranslate2.StorageView.from_array(np.ascontiguousarray(mel)), [prompt],
                                     beam_size=1)
            return _tokenizer().decode(res[0].sequences_ids[0]).strip()
        import torch

        with torch.no_grad():
            ids = self._hf.generate(torch.from_numpy(mel), language=language, task="transcribe")
        return self._processor.batch_decode(ids, skip_special_tokens=True)[0].strip()
