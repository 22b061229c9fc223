"""Neural architecture search (NAS) family: shared infrastructure for the weight-sharing / search papers of issue 15.

Vocabulary follows NASLib / NNI / OFA:
- ``space201``   NAS-Bench-201 cell space (5 ops, 6 edges, NASLib edge order, 15,625 cells) and a small torch network.
- ``benchmarks`` published ground truth read offline: NAS-Bench-201 CIFAR-10 accuracies (from the AnalogNAS-Bench
  pickle) and NAS-Bench-Graph (26,206 GNN architectures); both through a restricted unpickler.
- ``groundtruth`` the upstream DVC stage ``nas_groundtruth`` (cells trained standalone on a real shipped image set).
- ``rank``       rank metrics (Kendall tau, Spearman, top-k overlap, regret) with intervals over seeds.
- ``search``     random search, regularized evolution, NSGA-II / hypervolume (pymoo), Pareto-front helper.
Foundation B adds the elastic CNN, samplers and BN recalibration (``elastic``, ``samplers``, ``bn``).
- ``elastic``    OFA dynamic ops (DynamicConv2d / DynamicBatchNorm2d / DynamicLinear / DynamicLayerNorm), ElasticCNN
  (d / e / ks / w), get_active_subnet, elastic fake quantization (QuantSpec), in-place distillation, sandwich_step.
- ``samplers``   uniform, sandwich, complexity-binned (rejection / per-bin), importance sampling of paths.
- ``bn``         BN recalibration (OFA set_running_statistics; BigNAS cumulative).
- ``supernet201`` NB-201 one-shot supernet (MixedOp per edge; single path or DARTS mixture; ``extract`` a child).
- ``harness``    shared training / evaluation loop (image splits, SGD + cosine, sandwich training, child evaluation
  with BN recalibration).
- ``flops``      analytic / hook / torch-counter MACs, parameters, CPU latency (a timing, never a metric).

Data: ``data/nas_bench_graph/`` and ``data/analog_nasbench/`` (``reprolab.data.sources``, ``make data``); the ground
truth JSON ``generated/nas-groundtruth/groundtruth.json`` (DVC stage ``nas_groundtruth``, params ``nas_groundtruth``).
"""
