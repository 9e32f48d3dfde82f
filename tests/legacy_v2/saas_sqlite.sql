BEGIN TRANSACTION;
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
INSERT INTO "meta" VALUES('schema_version','2');
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
INSERT INTO "saas_batches" VALUES('af5dc47aa0814cd5a5974a0c38b37c27','{"UsageRecords":[{"CustomerAWSAccountId":"111111111111","Dimension":"scans","LicenseArn":"arn:aws:license-manager::111111111111:license:l-111111111111","Quantity":2,"Timestamp":1799991000}]}',1,'done',NULL,1799992920.0,1800010680.0,1,'ok',1799992921.0);
INSERT INTO "saas_batches" VALUES('1db35fe1c87448d583997c33c58b5d24','{"UsageRecords":[{"CustomerAWSAccountId":"111111111111","Dimension":"scans","LicenseArn":"arn:aws:license-manager::111111111111:license:l-111111111111","Quantity":7,"Timestamp":1799994600},{"CustomerAWSAccountId":"222222222222","Dimension":"users","LicenseArn":"arn:aws:license-manager::222222222222:license:l-222222222222","Quantity":3,"Timestamp":1799994600}]}',2,'sending',NULL,1799996520.0,1800014280.0,0,NULL,NULL);
CREATE TABLE saas_counts (
    hour BIGINT NOT NULL,
    dimension TEXT NOT NULL,
    state TEXT NOT NULL,
    records BIGINT NOT NULL,
    quantity BIGINT NOT NULL,
    PRIMARY KEY (hour, dimension, state)
);
INSERT INTO "saas_counts" VALUES(499997,'scans','sealed',0,0);
INSERT INTO "saas_counts" VALUES(499997,'scans','sent',1,2);
INSERT INTO "saas_counts" VALUES(499998,'scans','sealed',1,7);
INSERT INTO "saas_counts" VALUES(499998,'users','sealed',1,3);
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
);
INSERT INTO "saas_customers" VALUES('111111111111/arn:aws:license-manager::111111111111:license:l-111111111111','111111111111','arn:aws:license-manager::111111111111:license:l-111111111111','p',NULL,'active',1799985600.0,NULL,1799985600.0,'6c02cf2083469e72758a38be0b7c6eabe9bc58580774daf6b2cf4b6ea1469722',1799989200.0);
INSERT INTO "saas_customers" VALUES('222222222222/arn:aws:license-manager::222222222222:license:l-222222222222','222222222222','arn:aws:license-manager::222222222222:license:l-222222222222','p',NULL,'active',1799985600.0,NULL,1799985600.0,'3f08aace122ee2368432c1ca23a049bc640bafbf00fdf33a52429f38ba12dbf9',1799989200.0);
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
INSERT INTO "saas_keys" VALUES('k-0','d6e9994bcd63e4415a3290a278f6b87f01b5433007c6c76e3a08824b83a620a8','{"customer":"111111111111/arn:aws:license-manager::111111111111:license:l-111111111111","dimension":"scans","hour":"2027-01-15T05:00:00Z","id":"k-0","quantity":2}',1799989800.0);
INSERT INTO "saas_keys" VALUES('k-1','5de0cd48536c07adcabf219431189fb60cc9fc0f356a0e9112fad6e317e21421','{"customer":"111111111111/arn:aws:license-manager::111111111111:license:l-111111111111","dimension":"scans","hour":"2027-01-15T06:00:00Z","id":"k-1","quantity":7}',1799993400.0);
INSERT INTO "saas_keys" VALUES('k-2','52b5ea798197e902f4e4b88f2b98982a65e45a1280f2894eeb2b09a2f4c59747','{"customer":"222222222222/arn:aws:license-manager::222222222222:license:l-222222222222","dimension":"users","hour":"2027-01-15T06:00:00Z","id":"k-2","quantity":3}',1799993400.0);
INSERT INTO "saas_keys" VALUES('k-3','499eb6b250fd6412268ac33ce65545822510de108edf5194a127f06117059273','{"customer":"111111111111/arn:aws:license-manager::111111111111:license:l-111111111111","dimension":"scans","hour":"2027-01-15T07:00:00Z","id":"k-3","quantity":5}',1799999880.0);
CREATE TABLE saas_open (
    customer TEXT NOT NULL,
    dimension TEXT NOT NULL,
    hour BIGINT NOT NULL,
    quantity BIGINT NOT NULL,
    PRIMARY KEY (customer, dimension, hour)
);
INSERT INTO "saas_open" VALUES('111111111111/arn:aws:license-manager::111111111111:license:l-111111111111','scans',499999,5);
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
INSERT INTO "saas_outbox" VALUES('111111111111/arn:aws:license-manager::111111111111:license:l-111111111111','scans',499997,2,0,'{"CustomerAWSAccountId":"111111111111","Dimension":"scans","LicenseArn":"arn:aws:license-manager::111111111111:license:l-111111111111","Quantity":2,"Timestamp":1799991000}','sent','af5dc47aa0814cd5a5974a0c38b37c27',1799992860.0,1800010680.0,'m-0','Success',NULL,1799992921.0);
INSERT INTO "saas_outbox" VALUES('111111111111/arn:aws:license-manager::111111111111:license:l-111111111111','scans',499998,7,0,'{"CustomerAWSAccountId":"111111111111","Dimension":"scans","LicenseArn":"arn:aws:license-manager::111111111111:license:l-111111111111","Quantity":7,"Timestamp":1799994600}','sealed','1db35fe1c87448d583997c33c58b5d24',1799996460.0,1800014280.0,NULL,NULL,NULL,NULL);
INSERT INTO "saas_outbox" VALUES('222222222222/arn:aws:license-manager::222222222222:license:l-222222222222','users',499998,3,0,'{"CustomerAWSAccountId":"222222222222","Dimension":"users","LicenseArn":"arn:aws:license-manager::222222222222:license:l-222222222222","Quantity":3,"Timestamp":1799994600}','sealed','1db35fe1c87448d583997c33c58b5d24',1799996460.0,1800014280.0,NULL,NULL,NULL,NULL);
CREATE TABLE saas_records (
    id TEXT PRIMARY KEY,
    customer TEXT NOT NULL,
    dimension TEXT NOT NULL,
    hour BIGINT NOT NULL,
    quantity BIGINT NOT NULL,
    received_at DOUBLE PRECISION NOT NULL,
    carried_from BIGINT
);
INSERT INTO "saas_records" VALUES('k-8d457119b0934bd7bb769c90f6b66fdd','111111111111/arn:aws:license-manager::111111111111:license:l-111111111111','scans',499997,2,1799989800.0,NULL);
INSERT INTO "saas_records" VALUES('k-09359458e9994f75bef548e7b8c0c0b4','111111111111/arn:aws:license-manager::111111111111:license:l-111111111111','scans',499998,7,1799993400.0,NULL);
INSERT INTO "saas_records" VALUES('k-2fec9b21ce3f4eb292999ab3741463ea','222222222222/arn:aws:license-manager::222222222222:license:l-222222222222','users',499998,3,1799993400.0,NULL);
INSERT INTO "saas_records" VALUES('k-7cae7dc80ac643c6b4230a3852cc32f4','111111111111/arn:aws:license-manager::111111111111:license:l-111111111111','scans',499999,5,1799999880.0,NULL);
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
COMMIT;
