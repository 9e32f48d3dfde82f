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
INSERT INTO "hours" VALUES('scans',499997,'sent','usage',2500000,'{"ClientToken":"30f3843a869548f3a9147f23b654f211","ProductCode":"prod-abc","Timestamp":1799992799,"UsageDimension":"scans","UsageQuantityAsDecimal":"2.5"}',1799992860.0,1799993160.0,1800010680.0,1,NULL,NULL,'m-1',1799993200.0);
INSERT INTO "hours" VALUES('scans',499998,'sealed','usage',7000001,'{"ClientToken":"85ff53548cc241e78373349092dc7a31","ProductCode":"prod-abc","Timestamp":1799996399,"UsageDimension":"scans","UsageQuantityAsDecimal":"7.000001"}',1799996460.0,1799996760.0,1800014280.0,0,NULL,NULL,NULL,NULL);
INSERT INTO "hours" VALUES('users',499998,'sealed','usage',3250000,'{"ClientToken":"97e00de24ad14db084a53c9c84c0f208","ProductCode":"prod-abc","Timestamp":1799996399,"UsageAllocations":[{"AllocatedUsageQuantityAsDecimal":"1.25","Tags":[{"Key":"team","Value":"x"}]},{"AllocatedUsageQuantityAsDecimal":"2","Tags":[{"Key":"team","Value":"y"}]}],"UsageDimension":"users","UsageQuantityAsDecimal":"3.25"}',1799996460.0,1799996760.0,1800014280.0,0,NULL,NULL,NULL,NULL);
CREATE TABLE ids (
    id BLOB PRIMARY KEY,
    body BLOB NOT NULL,
    made INTEGER NOT NULL,
    counted INTEGER NOT NULL,
    carried INTEGER NOT NULL
) WITHOUT ROWID;
INSERT INTO "ids" VALUES(X'3090701AA14CBECB46AAE311',X'543664E44DDA6D86',499997,0,0);
INSERT INTO "ids" VALUES(X'46E9BC3476C92EA24FB17ADA',X'E45EB2B07414B1D6',499998,0,0);
INSERT INTO "ids" VALUES(X'6A840BAF5D8C3FF241688AEB',X'81A1CBC4E2565AA9',499998,0,0);
INSERT INTO "ids" VALUES(X'B1AD9FF6EB8DAD4AA4195031',X'F21200CC0CF52716',499999,0,0);
INSERT INTO "ids" VALUES(X'EB6AE235D507A0F5FE1208E3',X'7646586BD71B8040',499999,0,-1);
INSERT INTO "ids" VALUES(X'F55FF16F66F43360266B95DB',X'0E47F9C68FC843DC',499999,0,0);
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
INSERT INTO "meta" VALUES('schema_version','3');
CREATE TABLE open_hours (
    dimension TEXT NOT NULL,
    hour INTEGER NOT NULL,
    quantity INTEGER NOT NULL DEFAULT 0,
    tagsets INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (dimension, hour)
) WITHOUT ROWID;
INSERT INTO "open_hours" VALUES('scans',499999,6500000,0);
INSERT INTO "open_hours" VALUES('users',499999,4000000,1);
CREATE TABLE open_tags (
    dimension TEXT NOT NULL,
    hour INTEGER NOT NULL,
    tags TEXT NOT NULL,
    quantity INTEGER NOT NULL,
    n INTEGER NOT NULL,
    carried INTEGER NOT NULL,
    PRIMARY KEY (dimension, hour, tags)
) WITHOUT ROWID;
INSERT INTO "open_tags" VALUES('scans',499999,'',6500000,3,1);
INSERT INTO "open_tags" VALUES('users',499999,'{"team":"y"}',4000000,1,0);
CREATE TABLE verdict (one INTEGER PRIMARY KEY CHECK (one = 1), error TEXT NOT NULL);
CREATE INDEX hours_by_state ON hours (state, send_after);
COMMIT;
