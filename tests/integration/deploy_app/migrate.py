"""Stand-in for `npx prisma migrate deploy`: fails when the build carries migrations/FAIL saying 1."""

import sys
from pathlib import Path

FLAG = Path(__file__).parent / "migrations" / "FAIL"
if FLAG.exists() and FLAG.read_text().strip() == "1":
    print("Error: P3018 migration 20260112_add_column failed: column already exists", flush=True)
    sys.exit(1)
print("All migrations have been successfully applied.", flush=True)
