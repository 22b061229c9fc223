"""Elastic, shared and distilled transformers (issue 16): one small transformer family and one distillation kit.

- ``tiny``     ``TinyTransformer`` (causal LM, BERT-style encoder, ViT, speech-frame encoder) with elastic embedding
  width, depth, heads and feed-forward width (first-k slicing, reusing ``nas.elastic.DynamicLinear`` /
  ``DynamicLayerNorm``), recursion (``loops``), pluggable projections, ``get_active_subnet``, parameter / MAC
  accounting.
- ``distill``  logit KD (= ``nas.elastic.inplace_distillation_loss``), hidden-state KD with learned projections,
  MiniLMv2 attention-relation KD, hooks for a Hugging Face BERT teacher's queries / keys / values.
- ``data``     byte-level LM windows of the shipped texts; JapaneseVowels frames (images: ``nas.harness.image_data``).

Training loops: ``nas.harness.train_model`` (``optimizer="adamw"`` for transformers) and ``harness.batches``.
Real pretrained teachers offline: ``lm.load_encoder("minilm-l6")`` (all-MiniLM-L6-v2), ``lm.load_causal_lm(
"smollm2-135m")``, ``explain.leta.load_mobilenet_v2`` (MobileNetV2 ImageNet).
"""
