"""Postmaster: an ESMTP mail transfer agent for small sites, relay hosts and boxes that must just send mail."""

__version__ = "0.1.0"
