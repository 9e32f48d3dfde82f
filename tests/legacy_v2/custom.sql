BEGIN TRANSACTION;
CREATE TABLE hours (
    dimension TEXT NOT NULL,
    hour INTEGER NOT NULL,
    state TEXT NOT NULL,
    purpose TEXT NOT NULL,
    quantity INTEGER NOT NULL,
    request TEXT NOT NULL,
    sealed_at REAL NOT NULL,
    send_after REAL NOT NULL,
    deadline REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    last_code TEXT,
    last_error TEXT,
    record_id TEXT,
    done_at REAL,
    PRIMARY KEY (dimension, hour)
);
INSERT INTO "hours" VALUES('scans',499997,'sent','usage',2,'{"ClientToken":"15ba26c6959e4ffd8364fb4cc9973f51","ProductCode":"prod-abc","Timestamp":1799992799,"UsageDimension":"scans","UsageQuantity":2}',1799992860.0,1799993160.0,1800010680.0,1,NULL,NULL,'m-1',1799993200.0);
INSERT INTO "hours" VALUES('scans',499998,'sealed','usage',7,'{"ClientToken":"07d91eea1e21452e91579d5325e5879e","ProductCode":"prod-abc","Timestamp":1799996399,"UsageDimension":"scans","UsageQuantity":7}',1799996460.0,1799996760.0,1800014280.0,0,NULL,NULL,NULL,NULL);
INSERT INTO "hours" VALUES('users',499998,'sealed','usage',3,'{"ClientToken":"108fd54e6b4e4774ab4dd7c8bcda8e51","ProductCode":"prod-abc","Timestamp":1799996399,"UsageAllocations":[{"AllocatedUsageQuantity":1,"Tags":[{"Key":"team","Value":"x"}]},{"AllocatedUsageQuantity":2,"Tags":[{"Key":"team","Value":"y"}]}],"UsageDimension":"users","UsageQuantity":3}',1799996460.0,1799996760.0,1800014280.0,0,NULL,NULL,NULL,NULL);
CREATE TABLE ids (
    id BLOB PRIMARY KEY,
    body BLOB NOT NULL,
    made INTEGER NOT NULL,
    counted INTEGER NOT NULL,
    carried INTEGER NOT NULL
) WITHOUT ROWID;
INSERT INTO "ids" VALUES(X'3090701AA14CBECB46AAE311',X'41F632122B284979',499997,0,0);
INSERT INTO "ids" VALUES(X'6A840BAF5D8C3FF241688AEB',X'F871EACEB3798BAE',499998,0,0);
INSERT INTO "ids" VALUES(X'A24A7F55F278DD49FB1F99C5',X'5386475070D39C79',499998,0,0);
INSERT INTO "ids" VALUES(X'F55FF16F66F43360266B95DB',X'0E47F9C68FC843DC',499999,0,0);
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
INSERT INTO "meta" VALUES('schema_version','2');
CREATE TABLE open_hours (
    dimension TEXT NOT NULL,
    hour INTEGER NOT NULL,
    quantity INTEGER NOT NULL DEFAULT 0,
    tagsets INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (dimension, hour)
) WITHOUT ROWID;
INSERT INTO "open_hours" VALUES('scans',499999,9,0);
CREATE TABLE open_tags (
    dimension TEXT NOT NULL,
    hour INTEGER NOT NULL,
    tags TEXT NOT NULL,
    quantity INTEGER NOT NULL,
    n INTEGER NOT NULL,
    carried INTEGER NOT NULL,
    PRIMARY KEY (dimension, hour, tags)
) WITHOUT ROWID;
INSERT INTO "open_tags" VALUES('scans',499999,'',9,2,0);
CREATE TABLE verdict (one INTEGER PRIMARY KEY CHECK (one = 1), error TEXT NOT NULL);
CREATE INDEX hours_by_state ON hours (state, send_after);
COMMIT;
