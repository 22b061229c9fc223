"""Backdoor attacks and defences: triggers (text tokens, image patches), poisoning, attack success rate, NeuBA, honeypots, SRA."""
