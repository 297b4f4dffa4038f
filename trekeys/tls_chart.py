"""A timeline chart of certificate expiries for the audit notebook and reports."""

from __future__ import annotations

import base64
import html
import io
from datetime import timedelta

from trekeys.tls_audit import CertificateFinding, TlsAuditReport

_COLOURS = {"FAIL": "#c0392b", "WARN": "#e67e22", "ok": "#27ae60"}


def expiry_timeline_png(report: TlsAuditReport, *, dpi: int = 100) -> bytes:
    """Draw each audited certificate's validity as a bar and return a PNG.

    Bars run from the start to the end of validity, coloured by verdict (red
    for failures, orange for warnings). Vertical lines mark the audit time and
    the end of the warning period. Findings without a certificate, such as an
    unreachable endpoint, are left out.
    """
    # Importing pyplot is avoided so that no GUI backend is chosen on a
    # headless host; a bare Figure renders with the Agg canvas.
    from matplotlib.dates import date2num
    from matplotlib.figure import Figure

    findings = [f for f in report.findings if f.not_after and f.not_before]
    findings.sort(key=lambda f: f.days_left or 0)
    figure = Figure(figsize=(10, 1.2 + 0.45 * max(len(findings), 1)), dpi=dpi)
    axes = figure.add_subplot()
    axes.xaxis_date()

    for row, finding in enumerate(findings):
        starts, ends = date2num(finding.not_before), date2num(finding.not_after)
        axes.barh(
            row, ends - starts, left=starts, color=_COLOURS[finding.verdict], height=0.6
        )
        axes.annotate(
            f"  {finding.not_after:%Y-%m-%d} ({finding.days_left} d)",
            (ends, row),
            va="center",
            fontsize=8,
        )

    now = report.checked_at
    axes.axvline(date2num(now), color="black", linewidth=1)
    warning_end = now + timedelta(days=report.warning_days)
    axes.axvline(
        date2num(warning_end), color=_COLOURS["WARN"], linestyle="--", linewidth=1
    )
    axes.set_yticks(range(len(findings)), [_label(f) for f in findings], fontsize=8)
    axes.set_title(
        f"Certificate validity (audit {now:%Y-%m-%d %H:%M} UTC; dashed line: "
        f"{report.warning_days}-day warning)",
        fontsize=10,
    )
    figure.tight_layout()

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def expiry_timeline_alt(report: TlsAuditReport) -> str:
    """Describe the timeline in one sentence, as alternative text for the image."""
    findings = [f for f in report.findings if f.not_after]
    if not findings:
        return "Certificate expiry timeline: no certificate could be read."
    soonest = min(findings, key=lambda f: f.not_after or report.checked_at)
    failing = sum(1 for f in findings if f.verdict == "FAIL")
    warned = sum(1 for f in findings if f.verdict == "WARN")
    return (
        f"Certificate expiry timeline of {len(findings)} certificates, {failing} "
        f"failing and {warned} with warnings; the first to expire is "
        f"{_label(soonest)} on {soonest.not_after:%Y-%m-%d}."
    )


def expiry_timeline_html(png: bytes, alt: str) -> str:
    """Return an HTML ``img`` element that embeds `png` with alternative text.

    The notebook shows the chart as HTML because nbconvert's default (lab)
    HTML template drops the ``alt`` metadata of a PNG output and warns.
    """
    data = base64.b64encode(png).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}"/>'


def _label(finding: CertificateFinding) -> str:
    if finding.is_ca:
        name = f"CA {finding.vault_key or finding.subject}"
    else:
        name = finding.service or finding.subject
    where = "live " if finding.origin == "endpoint" else ""
    return f"{where}{name} [{finding.verdict}]"
