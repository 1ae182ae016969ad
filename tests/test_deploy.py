"""The deploy sequence: derived from the database, idempotent, resumable after SIGKILL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import psycopg
import pytest

from cdc import capture, deploy, project
from cdc.deploy import DeployOptions, Step
from cdc.errors import DeployStoppedError
from cdc.stage import Stage

TENANTS = ["user_1", "user_2", "user_4", "user_5", "template_tenant"]
FAST = DeployOptions(shadow_wait_s=0.1, contract_min_table_age_s=0, confirm_contract=True)


def stages(url: str) -> dict[str, str]:
    with psycopg.connect(url) as conn:
        rows = conn.execute("SELECT tenant, stage FROM imgmig.tenant_state").fetchall()
    return {str(r[0]): str(r[1]) for r in rows}


def shadow_reads(url: str) -> None:
    """Stand in for service traffic during the shadow period: clean reads, no mismatch."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("UPDATE imgmig.shadow_stats SET reads = reads + 10")


def test_plan_lists_every_step_for_a_fresh_database(seeded_url: str) -> None:
    """Before anything ran, every tenant has the whole sequence ahead of it."""
    with psycopg.connect(seeded_url) as conn:
        steps = deploy.plan(conn, None)
    assert set(steps) == set(TENANTS)
    assert all(s == list(Step) for s in steps.values())


def test_run_stops_at_the_shadow_period_then_resumes_to_contract(seeded_url: str) -> None:
    """Without shadow reads the run stops before `table`; with them it goes on to contract."""
    with pytest.raises(DeployStoppedError, match="shadow"):
        deploy.run(seeded_url, None, FAST)
    assert set(stages(seeded_url).values()) == {"shadow_read"}
    shadow_reads(seeded_url)
    left = deploy.run(seeded_url, None, FAST)
    assert left == dict.fromkeys(TENANTS)
    assert set(stages(seeded_url).values()) == {"contracted"}
    again = deploy.run(seeded_url, None, FAST)  # a finished deploy: nothing changes
    assert again == left


def test_contract_needs_confirmation_and_canaries_go_first(seeded_url: str) -> None:
    """Canary tenants reach table first; without --confirm-contract the run stops at table."""
    steps: list[tuple[str, Step]] = []
    options = DeployOptions(shadow_wait_s=0.1, contract_min_table_age_s=0, canary=("user_5",))
    with pytest.raises(DeployStoppedError):
        deploy.run(seeded_url, None, options, on_step=lambda t, s: steps.append((t, s)))
    assert stages(seeded_url)["user_5"] == "shadow_read"
    assert "user_1" not in stages(seeded_url), "the others wait for the canary"
    shadow_reads(seeded_url)
    with pytest.raises(DeployStoppedError, match="shadow"):
        deploy.run(seeded_url, None, options, on_step=lambda t, s: steps.append((t, s)))
    assert stages(seeded_url)["user_5"] == "table"
    shadow_reads(seeded_url)
    with pytest.raises(DeployStoppedError, match="--confirm-contract"):
        deploy.run(seeded_url, None, options, on_step=lambda t, s: steps.append((t, s)))
    tables = [t for t, s in steps if s is Step.TABLE]
    assert tables[0] == "user_5"
    assert set(stages(seeded_url).values()) == {"table"}


def test_rollback_goes_back_one_step_at_a_time(seeded_url: str) -> None:
    """contracted → table (restoring downgrade) → shadow_read → dual_write, then stops."""
    with pytest.raises(DeployStoppedError):
        deploy.run(seeded_url, ["user_4"], FAST)
    shadow_reads(seeded_url)
    deploy.run(seeded_url, ["user_4"], FAST)
    assert stages(seeded_url)["user_4"] == "contracted"
    assert deploy.rollback(seeded_url, ["user_4"], reason="test") == {"user_4": Stage.TABLE}
    with psycopg.connect(seeded_url) as conn:
        filled = conn.execute(
            "SELECT count(*) FROM user_4.products WHERE images <> '[]'"
        ).fetchone()
    assert filled is not None
    assert filled[0] > 0, "the downgrade restored the JSONB"
    result = deploy.rollback(seeded_url, ["user_4"], to=Stage.DUAL_WRITE, reason="test")
    assert result == {"user_4": Stage.DUAL_WRITE}
    assert deploy.rollback(seeded_url, ["user_4"], reason="test") == {"user_4": Stage.DUAL_WRITE}


def test_a_trip_back_to_jsonb_is_backfilled_and_verified_again(seeded_url: str) -> None:
    """Legacy writes made while the tenant was back at jsonb (capture off) reach the table
    before it becomes the truth: the next run backfills and verifies again."""
    with pytest.raises(DeployStoppedError, match="shadow"):
        deploy.run(seeded_url, ["user_4"], FAST)
    assert deploy.rollback(seeded_url, ["user_4"], to=Stage.JSONB, reason="test") == {
        "user_4": Stage.JSONB
    }
    with psycopg.connect(seeded_url) as conn:
        written = conn.execute(
            "UPDATE user_4.products SET images = images || jsonb_build_array(jsonb_build_object("
            "'url', 'https://cdn.example/while-off-' || id || '.jpg', "
            "'order', jsonb_array_length(images))) WHERE id % 10 = 0"
        ).rowcount
    assert written > 0
    with pytest.raises(DeployStoppedError, match="shadow"):
        deploy.run(seeded_url, ["user_4"], FAST)
    shadow_reads(seeded_url)
    deploy.run(seeded_url, ["user_4"], FAST)
    with psycopg.connect(seeded_url) as conn:
        kept = conn.execute(
            "SELECT count(*) FROM user_4.product_images WHERE url LIKE '%/while-off-%'"
        ).fetchone()
    assert kept == (written,)
    assert stages(seeded_url)["user_4"] == "contracted"


def test_a_deferred_tenant_goes_inline_before_table_with_its_log_applied(seeded_url: str) -> None:
    """Stage table needs inline projection: the run switches a deferred tenant first, which
    projects the legacy writes still waiting in its log, so the contract loses none."""
    with pytest.raises(DeployStoppedError, match="shadow"):
        deploy.run(seeded_url, ["user_5"], FAST)
    with psycopg.connect(seeded_url, autocommit=True) as conn:
        project.switch(conn, "user_5", "deferred")
        written = conn.execute(
            "UPDATE user_5.products SET images = images || jsonb_build_array(jsonb_build_object("
            "'url', 'https://cdn.example/deferred-' || id || '.jpg', "
            "'order', jsonb_array_length(images))) WHERE id % 10 = 0"
        ).rowcount
        assert project.lag(conn, "user_5").pending >= written > 0
    shadow_reads(seeded_url)
    deploy.run(seeded_url, ["user_5"], FAST)
    assert stages(seeded_url)["user_5"] == "contracted"
    with psycopg.connect(seeded_url) as conn:
        kept = conn.execute(
            "SELECT count(*) FROM user_5.product_images WHERE url LIKE '%/deferred-%'"
        ).fetchone()
        assert kept == (written,)
        assert capture.projection_of(conn, "user_5") == "inline"


@pytest.mark.slow
def test_deploy_resumes_after_sigkill_between_steps(seeded_url: str) -> None:
    """A `deploy run` SIGKILLed after some steps is finished by the next run."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "cdc", "--log-format", "json", "--database-url", seeded_url,
           "deploy", "run", "--shadow-wait", "0.1", "--contract-min-table-age", "0",
           "--confirm-contract"]  # fmt: skip
    for kill_after in (3, 7):
        with subprocess.Popen(
            cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env
        ) as proc:
            assert proc.stderr is not None
            done = 0
            for line in proc.stderr:
                if '"deploy step done"' in line:
                    done += 1
                    if done == kill_after:
                        proc.send_signal(signal.SIGKILL)
                        break
            proc.wait(timeout=60)
        assert proc.returncode == -signal.SIGKILL
    for _ in range(4):  # resume; feed the shadow period whenever the run waits for it
        final = subprocess.run(
            cmd, capture_output=True, text=True, timeout=300, env=env, check=False
        )
        if final.returncode != 2 or "shadow" not in final.stderr:
            break
        shadow_reads(seeded_url)
    assert final.returncode == 0, final.stderr[-600:]
    assert set(stages(seeded_url).values()) == {"contracted"}
    with psycopg.connect(seeded_url) as conn:
        rows = conn.execute("SELECT count(*) FROM user_1.product_images").fetchone()
        archived = conn.execute(
            "SELECT sum(jsonb_array_length(images))::bigint FROM imgmig.images_archive "
            "WHERE tenant = 'user_1'"
        ).fetchone()
    assert rows == archived, "every archived image is in the table"
