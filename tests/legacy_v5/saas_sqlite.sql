BEGIN TRANSACTION;
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
INSERT INTO "meta" VALUES('schema_version','5');
CREATE TABLE saas_batches (
    id TEXT PRIMARY KEY,
    request TEXT NOT NULL,
    records BIGINT NOT NULL,
    state TEXT NOT NULL,
    parent TEXT,
    created_at DOUBLE PRECISION NOT NULL,
    deadline DOUBLE PRECISION NOT NULL,
    attempts BIGINT NOT NULL DEFAULT 0,
    last_code TEXT,
    answered_at DOUBLE PRECISION
);
INSERT INTO "saas_batches" VALUES('7dcd1c81c79f43a4897b19968afa13f4','{"UsageRecords":[{"CustomerAWSAccountId":"111111111111","Dimension":"scans","LicenseArn":"arn:aws:license-manager::111111111111:license:l-111111111111","QuantityAsDecimal":"2.5","Timestamp":1799991000}]}',1,'done',NULL,1799992920.0,1800075480.0,1,'ok',1799992921.0);
INSERT INTO "saas_batches" VALUES('cdf2c57262fd4b3190c17571f70aff4d','{"UsageRecords":[{"CustomerAWSAccountId":"111111111111","Dimension":"scans","LicenseArn":"arn:aws:license-manager::111111111111:license:l-111111111111","QuantityAsDecimal":"7.000001","Timestamp":1799994600},{"CustomerAWSAccountId":"222222222222","Dimension":"users","LicenseArn":"arn:aws:license-manager::222222222222:license:l-222222222222","QuantityAsDecimal":"3","Timestamp":1799994600}]}',2,'sending',NULL,1799996520.0,1800079080.0,0,NULL,NULL);
CREATE TABLE saas_changes (seq INTEGER PRIMARY KEY AUTOINCREMENT, subject TEXT NOT NULL, at DOUBLE PRECISION NOT NULL);
CREATE TABLE saas_contract_hours (
    customer TEXT NOT NULL,
    dimension TEXT NOT NULL,
    hour BIGINT NOT NULL,
    basis TEXT NOT NULL,
    used BIGINT NOT NULL,
    entitled TEXT,
    covered BIGINT NOT NULL,
    billed BIGINT NOT NULL,
    term_end DOUBLE PRECISION NOT NULL,
    why TEXT NOT NULL,
    sealed_at DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (customer, dimension, hour)
);
CREATE TABLE saas_counts (
    hour BIGINT NOT NULL,
    dimension TEXT NOT NULL,
    state TEXT NOT NULL,
    records BIGINT NOT NULL,
    quantity BIGINT NOT NULL,
    PRIMARY KEY (hour, dimension, state)
);
INSERT INTO "saas_counts" VALUES(499997,'scans','sealed',0,0);
INSERT INTO "saas_counts" VALUES(499997,'scans','sent',1,2500000);
INSERT INTO "saas_counts" VALUES(499998,'scans','sealed',1,7000001);
INSERT INTO "saas_counts" VALUES(499998,'users','sealed',1,3000000);
CREATE TABLE saas_customer_seals (
    customer TEXT NOT NULL,
    hour BIGINT NOT NULL,
    sealed_at DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (customer, hour)
);
CREATE TABLE saas_customers (
    customer TEXT PRIMARY KEY,
    account_id TEXT,
    license_arn TEXT,
    product_code TEXT,
    customer_identifier TEXT,
    state TEXT NOT NULL,
    state_since DOUBLE PRECISION NOT NULL,
    state_reason TEXT,
    resolved_at DOUBLE PRECISION NOT NULL,
    token_digest TEXT,
    token_expires DOUBLE PRECISION
, agreement_id TEXT);
INSERT INTO "saas_customers" VALUES('111111111111/arn:aws:license-manager::111111111111:license:l-111111111111','111111111111','arn:aws:license-manager::111111111111:license:l-111111111111','prod-abc',NULL,'active',1799985600.0,NULL,1799985600.0,'6c02cf2083469e72758a38be0b7c6eabe9bc58580774daf6b2cf4b6ea1469722',1799989200.0,'agmt-1111111111111111111111111');
INSERT INTO "saas_customers" VALUES('222222222222/arn:aws:license-manager::222222222222:license:l-222222222222','222222222222','arn:aws:license-manager::222222222222:license:l-222222222222','prod-abc',NULL,'active',1799985600.0,NULL,1799985600.0,'3f08aace122ee2368432c1ca23a049bc640bafbf00fdf33a52429f38ba12dbf9',1799989200.0,NULL);
CREATE TABLE saas_dead_letters (
    id TEXT PRIMARY KEY,
    body TEXT NOT NULL,
    bytes BIGINT NOT NULL,
    error TEXT NOT NULL,
    received_at DOUBLE PRECISION NOT NULL
);
CREATE TABLE saas_entitlements (
    subject TEXT NOT NULL,
    dimension TEXT NOT NULL,
    value TEXT NOT NULL,
    expiration DOUBLE PRECISION,
    learned_at DOUBLE PRECISION NOT NULL, kind TEXT,
    PRIMARY KEY (subject, dimension)
);
CREATE TABLE saas_events (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    subject TEXT NOT NULL,
    event_time DOUBLE PRECISION NOT NULL,
    applied_at DOUBLE PRECISION NOT NULL,
    outcome TEXT NOT NULL
);
CREATE TABLE saas_hour_sending (
    hour BIGINT PRIMARY KEY,
    sealed_at DOUBLE PRECISION NOT NULL,
    records BIGINT NOT NULL,
    backlog_before BIGINT NOT NULL,
    finished_at DOUBLE PRECISION
);
CREATE TABLE saas_hour_summary (
    hour BIGINT NOT NULL,
    dimension TEXT NOT NULL,
    state TEXT NOT NULL,
    records BIGINT NOT NULL,
    quantity BIGINT NOT NULL,
    zero_records BIGINT NOT NULL,
    PRIMARY KEY (hour, dimension, state)
);
CREATE TABLE saas_keys (
    id TEXT PRIMARY KEY, digest TEXT NOT NULL, answer TEXT NOT NULL,
    created_at DOUBLE PRECISION NOT NULL
);
INSERT INTO "saas_keys" VALUES('k-0','67261f0d90a55fa58845cec84fdd23caa16f68d19fec6ea64e085f79f6cd8d59','{"customer":"111111111111/arn:aws:license-manager::111111111111:license:l-111111111111","dimension":"scans","hour":"2027-01-15T05:00:00Z","id":"k-0","quantity":"2.5"}',1799989800.0);
INSERT INTO "saas_keys" VALUES('k-1','84ae55f84ba6eeb604eaaee23630a588373031e8aaefb7828446e8adb637da4b','{"customer":"111111111111/arn:aws:license-manager::111111111111:license:l-111111111111","dimension":"scans","hour":"2027-01-15T06:00:00Z","id":"k-1","quantity":"7.000001"}',1799993400.0);
INSERT INTO "saas_keys" VALUES('k-2','52b5ea798197e902f4e4b88f2b98982a65e45a1280f2894eeb2b09a2f4c59747','{"customer":"222222222222/arn:aws:license-manager::222222222222:license:l-222222222222","dimension":"users","hour":"2027-01-15T06:00:00Z","id":"k-2","quantity":3}',1799993400.0);
INSERT INTO "saas_keys" VALUES('k-3','499eb6b250fd6412268ac33ce65545822510de108edf5194a127f06117059273','{"customer":"111111111111/arn:aws:license-manager::111111111111:license:l-111111111111","dimension":"scans","hour":"2027-01-15T07:00:00Z","id":"k-3","quantity":5}',1799999880.0);
INSERT INTO "saas_keys" VALUES('k-late','55d15f1e29fb8d55eaedf8565bdf0d2144ac758b4c37f6479eb3b1e6b7ec04b2','{"carried_from":"2027-01-15T06:00:00Z","customer":"111111111111/arn:aws:license-manager::111111111111:license:l-111111111111","dimension":"scans","hour":"2027-01-15T07:00:00Z","id":"k-late","note":"hour 2027-01-15T06:00:00Z is already sealed or too old to send; counted in 2027-01-15T07:00:00Z","quantity":1}',1799999900.0);
CREATE TABLE saas_lifecycle (
    subject TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    state_time DOUBLE PRECISION NOT NULL,
    event_time DOUBLE PRECISION NOT NULL,
    left_at DOUBLE PRECISION,
    final_window_end DOUBLE PRECISION,
    agreement_id TEXT,
    license_arn TEXT,
    product_code TEXT,
    offer_id TEXT,
    free_trial INTEGER,
    last_event TEXT NOT NULL,
    updated_at DOUBLE PRECISION NOT NULL,
    entitlements_at DOUBLE PRECISION
, left_license TEXT);
CREATE TABLE saas_open (
    customer TEXT NOT NULL,
    dimension TEXT NOT NULL,
    hour BIGINT NOT NULL,
    quantity BIGINT NOT NULL,
    PRIMARY KEY (customer, dimension, hour)
);
INSERT INTO "saas_open" VALUES('111111111111/arn:aws:license-manager::111111111111:license:l-111111111111','scans',499999,6000000);
INSERT INTO "saas_open" VALUES('222222222222/arn:aws:license-manager::222222222222:license:l-222222222222','scans',499999,250000);
CREATE TABLE saas_outbox (
    customer TEXT NOT NULL,
    dimension TEXT NOT NULL,
    hour BIGINT NOT NULL,
    quantity BIGINT NOT NULL,
    zero INTEGER NOT NULL,
    record TEXT NOT NULL,
    state TEXT NOT NULL,
    batch_id TEXT,
    sealed_at DOUBLE PRECISION NOT NULL,
    deadline DOUBLE PRECISION NOT NULL,
    metering_record_id TEXT,
    last_code TEXT,
    last_error TEXT,
    done_at DOUBLE PRECISION,
    PRIMARY KEY (customer, dimension, hour)
);
INSERT INTO "saas_outbox" VALUES('111111111111/arn:aws:license-manager::111111111111:license:l-111111111111','scans',499997,2500000,0,'{"CustomerAWSAccountId":"111111111111","Dimension":"scans","LicenseArn":"arn:aws:license-manager::111111111111:license:l-111111111111","QuantityAsDecimal":"2.5","Timestamp":1799991000}','sent','7dcd1c81c79f43a4897b19968afa13f4',1799992860.0,1800075480.0,'m-0','Success',NULL,1799992921.0);
INSERT INTO "saas_outbox" VALUES('111111111111/arn:aws:license-manager::111111111111:license:l-111111111111','scans',499998,7000001,0,'{"CustomerAWSAccountId":"111111111111","Dimension":"scans","LicenseArn":"arn:aws:license-manager::111111111111:license:l-111111111111","QuantityAsDecimal":"7.000001","Timestamp":1799994600}','sealed','cdf2c57262fd4b3190c17571f70aff4d',1799996460.0,1800079080.0,NULL,NULL,NULL,NULL);
INSERT INTO "saas_outbox" VALUES('222222222222/arn:aws:license-manager::222222222222:license:l-222222222222','users',499998,3000000,0,'{"CustomerAWSAccountId":"222222222222","Dimension":"users","LicenseArn":"arn:aws:license-manager::222222222222:license:l-222222222222","QuantityAsDecimal":"3","Timestamp":1799994600}','sealed','cdf2c57262fd4b3190c17571f70aff4d',1799996460.0,1800079080.0,NULL,NULL,NULL,NULL);
CREATE TABLE saas_records (
    id TEXT PRIMARY KEY,
    customer TEXT NOT NULL,
    dimension TEXT NOT NULL,
    hour BIGINT NOT NULL,
    quantity BIGINT NOT NULL,
    received_at DOUBLE PRECISION NOT NULL,
    carried_from BIGINT
);
CREATE TABLE saas_sealed_hours (
    hour BIGINT PRIMARY KEY,
    sealed_at DOUBLE PRECISION NOT NULL,
    records BIGINT NOT NULL
);
INSERT INTO "saas_sealed_hours" VALUES(499997,1799992860.0,1);
INSERT INTO "saas_sealed_hours" VALUES(499998,1799996460.0,2);
CREATE INDEX saas_customers_by_token ON saas_customers (token_digest);
CREATE INDEX saas_customers_by_account ON saas_customers (account_id);
CREATE INDEX saas_customers_by_identifier ON saas_customers (customer_identifier);
CREATE INDEX saas_records_by_hour ON saas_records (hour, customer, dimension);
CREATE INDEX saas_open_by_hour ON saas_open (hour);
CREATE INDEX saas_outbox_by_batch ON saas_outbox (batch_id) WHERE batch_id IS NOT NULL;
CREATE INDEX saas_outbox_pool ON saas_outbox (deadline, customer, dimension)
    WHERE state = 'sealed' AND batch_id IS NULL;
CREATE INDEX saas_batches_by_state ON saas_batches (state, created_at);
CREATE INDEX saas_outbox_by_hour ON saas_outbox (hour);
CREATE TRIGGER saas_outbox_counted AFTER INSERT ON saas_outbox BEGIN
    INSERT INTO saas_counts (hour, dimension, state, records, quantity)
    VALUES (NEW.hour, NEW.dimension, NEW.state, 1, NEW.quantity)
    ON CONFLICT (hour, dimension, state) DO UPDATE SET records = records + 1,
    quantity = quantity + excluded.quantity;
END;
CREATE TRIGGER saas_outbox_recounted AFTER UPDATE OF state ON saas_outbox
WHEN OLD.state <> NEW.state BEGIN
    UPDATE saas_counts SET records = records - 1, quantity = quantity - OLD.quantity
    WHERE hour = OLD.hour AND dimension = OLD.dimension AND state = OLD.state;
    INSERT INTO saas_counts (hour, dimension, state, records, quantity)
    VALUES (NEW.hour, NEW.dimension, NEW.state, 1, NEW.quantity)
    ON CONFLICT (hour, dimension, state) DO UPDATE SET records = records + 1,
    quantity = quantity + excluded.quantity;
END;
CREATE INDEX saas_events_by_applied ON saas_events (applied_at);
CREATE INDEX saas_contract_hours_by_term ON saas_contract_hours (customer, dimension, term_end);
CREATE INDEX saas_contract_hours_hourly ON saas_contract_hours (hour) WHERE basis = 'hour';
CREATE INDEX saas_contract_hours_ended ON saas_contract_hours (term_end)
    WHERE basis = 'term' AND term_end <> -1;
CREATE INDEX saas_contract_hours_unused ON saas_contract_hours (hour) WHERE used = 0;
DELETE FROM "sqlite_sequence";
COMMIT;
