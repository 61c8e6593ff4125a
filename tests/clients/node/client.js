// The client matrix scenario with the Node.js `pg` driver, as an agent's tool runs it. Connection
// settings come from PG* environment variables (PGPASSWORD holds the JWT) and PGSSLROOTCERT; prints
// one JSON object with what each step returned, for tests/clients/test_node_pg.py to check.
"use strict";
const fs = require("fs");
const { Client } = require("pg");

async function outcome(client, sql, params) {
  try {
    const result = await client.query(sql, params);
    return { rows: result.rows };
  } catch (err) {
    return { code: err.code, message: err.message };
  }
}

async function main() {
  const client = new Client({
    ssl: { ca: fs.readFileSync(process.env.PGSSLROOTCERT, "utf8"), servername: "localhost" },
  });
  await client.connect();
  const report = {
    parameterised: await outcome(client, "select name from clientm.customers where id = $1", [1]),
    masked: await outcome(client, "select email from clientm.customers where id = 1"),
    denied: await outcome(client, "select * from clientm.salaries"),
    approval: await outcome(client, "delete from clientm.payouts"),
    after: await outcome(client, "select count(*)::int as n from clientm.payouts"),
  };
  await client.end();
  process.stdout.write(JSON.stringify(report));
}

main().catch((err) => {
  process.stderr.write(String(err.stack || err));
  process.exit(1);
});
