"""The benchmark report: figures and tables of a learngene's deployment, as Markdown and one HTML page."""

from tleg_deploy.report.build import ReportConfig, ReportResult, build_report

__all__ = ["ReportConfig", "ReportResult", "build_report"]
