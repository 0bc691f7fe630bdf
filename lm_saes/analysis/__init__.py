"""Feature analysis: what each latent responds to (analyzer, example stores, logit effects) and the dashboard."""

from lm_saes.analysis.analyzer import AnalysisConfig, FeatureAnalysis, FeatureAnalyzer
from lm_saes.analysis.files import FORMAT_VERSION, load_analysis, save_analysis

__all__ = ["AnalysisConfig", "FeatureAnalysis", "FeatureAnalyzer", "FORMAT_VERSION", "load_analysis", "save_analysis"]
