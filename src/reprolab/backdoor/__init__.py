"""Backdoor attacks and defences on text classifiers: triggers, poisoning, attack success rate, NeuBA, honeypots."""
