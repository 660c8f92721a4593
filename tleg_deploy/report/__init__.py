"""The benchmark report: figures and tables of a learngene's deployment, as Markdown and one HTML page."""

from tleg_deploy.report.build import DEFAULT_RESULTS, ReportConfig, ReportResult, build_report

__all__ = ["DEFAULT_RESULTS", "ReportConfig", "ReportResult", "build_report"]
