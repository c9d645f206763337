"""The ledger reader for analytics jobs (docs/ledger.md), under the public package name:

from flowtrail.ledger import LedgerReader
"""

from __future__ import annotations

from services.common.ledger_reader import LedgerItem, LedgerReader, ReaderStats, Start

__all__ = ["LedgerItem", "LedgerReader", "ReaderStats", "Start"]
