"""cryoformer.analysis — what users do with a trained run.

Public API (what the notebooks and the napari widgets call)
-----------------------------------------------------------
Latent space (:mod:`.latent_space`)
    ``pca(z) -> PcaResult``, ``kmeans(z, k, seed) -> KMeansResult`` (centres on the data),
    ``pc_traversal(pca_result, pc, n_points, percentiles) -> [n, zdim]``, ``nearest_on_data``.
Volumes (:mod:`.volumes`)
    ``decode_volumes(model, z, D) -> [M, D, D, D]``, ``iter_decoded``, ``write_volumes``,
    ``decoded_voxel_size(box_size, pixel_size_angstrom, D)``.
Attention maps (:mod:`.attention_maps`)
    ``attention_stack(model, z, D) -> [C + K, D, D, D]``, ``attention_channel_names(model)``,
    ``flex_score(model, z, D, method) -> [D, D, D]`` in [0, 1].
Flexible regions (:mod:`.flexible_regions`)
    ``density_flex_score(model, z, D) -> [D, D, D]`` (``flex_score``'s default method),
    ``flexible_regions(model, z, D)`` → integer region labels, 0 = not flexible.
Evaluation (:mod:`.evaluation`, :mod:`.evaluate`)
    ``evaluate_run(run, gt_maps, gt_labels, gt_motion, gt_poses, config) -> dict``,
    ``format_table(result)``; metric pieces ``heterogeneous_fsc``, ``flex_roc_auc``,
    ``distance_from_centre``, ``voxel_variance``, ``fourier_crop_volume``, ``resample_real``.
Whole analysis (:mod:`.analyze`)
    ``analyze_run(run, out_dir, AnalyzeConfig(...)) -> dict``, ``analysis_dir(run_dir, epoch)``.
Export (:mod:`.export`)
    ``select_clusters``, ``load_selection``, ``to_original_indices``, ``filter_star_rows``,
    ``write_cs_subset``, ``write_index_npy``, ``write_index_pkl``; ``export_run`` (run-level).
"""

from cryoformer.analysis.analyze import AnalyzeConfig, analysis_dir, analyze_run
from cryoformer.analysis.attention_maps import (FLEX_METHODS, attention_channel_names, attention_stack,
                                                flex_score)
from cryoformer.analysis.evaluate import EvaluateConfig, evaluate_run, format_table
from cryoformer.analysis.flexible_regions import FlexRegionConfig, density_flex_score, flexible_regions
from cryoformer.analysis.evaluation import (distance_from_centre, flex_roc_auc, fourier_crop_volume,
                                           heterogeneous_fsc, resample_real, support_mask,
                                           voxel_variance)
from cryoformer.analysis.export import (EXPORT_FORMATS, filter_star_rows, load_selection,
                                       select_clusters, to_original_indices, write_cs_subset,
                                       write_index_npy, write_index_pkl)
from cryoformer.analysis.latent_space import (KMeansResult, PcaResult, kmeans, nearest_on_data,
                                             pc_traversal, pca)
from cryoformer.analysis.volumes import (decode_volumes, decoded_voxel_size, iter_decoded,
                                        staged_directory, write_volumes)

__all__ = [
    "AnalyzeConfig", "analysis_dir", "analyze_run",
    "FLEX_METHODS", "attention_channel_names", "attention_stack", "flex_score",
    "FlexRegionConfig", "density_flex_score", "flexible_regions",
    "EvaluateConfig", "evaluate_run", "format_table",
    "distance_from_centre", "flex_roc_auc", "fourier_crop_volume", "heterogeneous_fsc",
    "resample_real", "support_mask", "voxel_variance",
    "EXPORT_FORMATS", "filter_star_rows", "load_selection", "select_clusters",
    "to_original_indices", "write_cs_subset", "write_index_npy", "write_index_pkl",
    "KMeansResult", "PcaResult", "kmeans", "nearest_on_data", "pc_traversal", "pca",
    "decode_volumes", "decoded_voxel_size", "iter_decoded", "staged_directory", "write_volumes",
]
